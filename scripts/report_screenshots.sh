#!/usr/bin/env bash
# docs/report-1280.png and docs/report-390.png: the audit report of the integration test's run
# (tests/integration/test_report.py make_run: scikit-image photos, every stage's manifest), rendered
# by headless Chromium at 1280 and 390 px wide, the top 2000 px, stored as 256-colour PNGs.
#   scripts/report_screenshots.sh            (chromium: apt-get install -y chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "report_screenshots: chromium is not installed (apt-get install -y chromium)" >&2; exit 1; }
WORK=${TMPDIR:-/tmp}/report-screenshots
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
PYTHONPATH=$PWD "$PY" - "$WORK" <<'PY'
import sys
from retrieval.report import build_report
from tests.integration.test_report import cfg_with, make_run

run = make_run(f"{sys.argv[1]}/run")
build_report(run.results, f"{sys.argv[1]}/report", cfg_with(top_queries=4, matches_per_query=3), truth_url=run.truth)
PY
for w in 1280 390; do
  HOME="$WORK/home" "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --disable-background-networking --disable-extensions --window-size="$w,2000" \
    --screenshot="$WORK/shot-$w.png" "file://$WORK/report/report.html" >/dev/null 2>&1
  PYTHONPATH=$PWD "$PY" - "$WORK/shot-$w.png" "docs/report-$w.png" <<'PY'
import sys
from PIL import Image

with Image.open(sys.argv[1]) as img:   # 256 colours: a few hundred KB, text stays sharp
    img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        sys.argv[2], optimize=True)
PY
  echo "docs/report-$w.png: $(stat -c %s "docs/report-$w.png") bytes"
done
