#!/usr/bin/env bash
# Set up the environment (idempotent) and run the pipeline end to end on the bundled sample,
# with the embedded defaults (Spark local[*], local files). Prints where the outputs are.
# Usage: scripts/demo.sh [OUT_DIR]   (default: ./demo_output)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$ROOT/.venv/bin/python"
OUT="$(mkdir -p "${1:-demo_output}" && cd "${1:-demo_output}" && pwd)"
R=.venv/bin/retrieval
log() { printf '\n== %s\n' "$*" >&2; }

log "sample: real photos (gallery) + generated copies and non-matching photos (queries)"
.venv/bin/python -m retrieval.sample "$OUT/sample" >/dev/null
log "extract gallery features"
$R extract --input "$OUT/sample/gallery" --output "$OUT/gallery_features" --role gallery --log-level WARNING
log "extract query features"
$R extract --input "$OUT/sample/queries" --output "$OUT/query_features" --role query --log-level WARNING

cat <<MSG

Outputs under $OUT:
  sample/            gallery/ (real photos), queries/ (copies + non-matching), truth.csv
  gallery_features/  part-*.parquet, errors/, _manifest.json
  query_features/    part-*.parquet, errors/, _manifest.json
MSG
