#!/usr/bin/env bash
# Sourced by scripts/training_sources.sh and tests/bench/quality_sources.sh: `unpack_debs TAG DEST PKG...`
# `apt-get download`s each package that DEST/<package>/.unpacked does not mark as done and
# `dpkg-deb -x`es it into DEST/<package>/ (files only: no program is installed), recording the
# unpacked version in DEST/<package>/.unpacked; then prints what DEST holds. Runs `apt-get update`
# at most once (shared with the caller through `apt_update`).
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() { [ "$updated" = 1 ] || { $SUDO apt-get update -qq; updated=1; }; }

unpack_debs() {
  local tag="$1" dest="$2" p tmp
  shift 2
  $SUDO mkdir -p "$dest"
  for p in "$@"; do
    [ -f "$dest/$p/.unpacked" ] && continue
    echo "$tag: apt-get download + dpkg-deb -x $p -> $dest/$p" >&2
    apt_update
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download -qq "$p" >/dev/null 2>&1) || { chmod 777 "$tmp"; (cd "$tmp" && $SUDO apt-get download -qq "$p" >/dev/null); }
    $SUDO rm -rf "$dest/$p"
    $SUDO mkdir -p "$dest/$p"
    $SUDO dpkg-deb -x "$tmp"/"${p}"_*.deb "$dest/$p"
    dpkg-deb -f "$tmp"/"${p}"_*.deb Version | $SUDO tee "$dest/$p/.unpacked" >/dev/null
    rm -rf "$tmp"
  done
  for p in "$@"; do echo "unpacked  $p $(cat "$dest/$p/.unpacked") in $dest/$p"; done
}
