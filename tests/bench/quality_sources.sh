#!/usr/bin/env bash
# The Debian packages whose photographs tests/bench/quality_data.py turns into the copy-detection
# quality benchmark (idempotent; run as root on a fresh machine of this kind).
#
#   tests/bench/quality_sources.sh          # installs / unpacks what is missing, prints what it has
#
# Two ways in, both by package name through apt:
# * INSTALL: data-only packages with no (or no heavy) dependencies -> `apt-get install`.
# * UNPACK:  packages whose photos sit beside a program (kphotoalbum's demo album) or docs whose
#   install would pull a TeX or Qt stack (texlive-*-doc, kstars-data): `apt-get download` and
#   `dpkg-deb -x` into $QUALITY_SOURCES_DIR/<package>/ (default /var/cache/quality-sources), so the
#   machine gets no programs, only the files. quality_data.py looks there first, then in /.
#
# Reserved for independent evaluation and never used (never read): desktop wallpaper / background /
# artwork packages (plasma-workspace-wallpapers, gnome-backgrounds, mate-backgrounds, ukui-wallpapers,
# lomiri-wallpapers*, desktop-base, ubuntu-wallpapers*, xfce4-artwork, debian-edu-artwork, ...) and
# tuxpaint-stamps-default. quality_data.py also skips any path containing wallpaper / backgrounds /
# tuxpaint.
set -euo pipefail
INSTALL="opencv-doc stellarium-data endless-sky-data gcompris-qt-data palapeli-data"
UNPACK="kphotoalbum kstars-data texlive-latex-extra-doc texlive-publishers-doc texlive-pictures-doc texlive-fonts-extra-doc"
DEST="${QUALITY_SOURCES_DIR:-/var/cache/quality-sources}"

. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/unpack_debs.sh"

missing=""
for p in $INSTALL; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "quality_sources: apt-get install$missing" >&2
  apt_update
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

for p in $INSTALL; do echo "installed $p $(dpkg-query -W -f='${Version}' "$p")"; done
unpack_debs quality_sources "$DEST" $UNPACK
