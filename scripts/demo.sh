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
mkdir -p "$OUT/logs"
log() { printf '== %s\n' "$*" >&2; }

log "sample: real photos (gallery) + generated copies and non-matching photos (queries)"
.venv/bin/python -m retrieval.sample "$OUT/sample" >/dev/null
log "1/6 fit the model to the gallery: whitening of both descriptors + adapter-2 re-fit (no labels needed)"
$R fit --input "$OUT/sample/gallery" --output "$OUT/model/fitted.pt" --log-level WARNING > "$OUT/logs/fit.json"
MODEL=(--set "model.checkpoint=$OUT/model/fitted.pt")
log "2/6 extract gallery features (gallery role: R_hi -> adapter 1 + fine head), and the background set"
$R extract --input "$OUT/sample/gallery" --output "$OUT/gallery_features" --role gallery "${MODEL[@]}" --log-level WARNING > "$OUT/logs/extract.json"
$R extract --input "$OUT/sample/background" --output "$OUT/background_features" --role gallery "${MODEL[@]}" --log-level WARNING > "$OUT/logs/extract-background.json"
log "3/6 build the sharded IVF-PQ index over the 128-d coarse codes"
$R index --features "$OUT/gallery_features" --output "$OUT/index" "${MODEL[@]}" --log-level WARNING > "$OUT/logs/index.json"
log "4/6 search: encode queries (R_lo -> adapter 2; R_hi -> fine), coarse per shard, merge, exact 512-d rerank, normalise"
$R search --queries "$OUT/sample/queries" --index "$OUT/index" --output "$OUT/matches" "${MODEL[@]}" \
   --set "search.normalize.background=$OUT/background_features" --log-level WARNING > "$OUT/logs/search.json"
log "5/6 evaluate against the ground truth (and exact 512-d search); thresholds at 90%/95% precision"
$R evaluate --results "$OUT/matches" --truth "$OUT/sample/truth.csv" --exact "$OUT/index" \
   --output "$OUT/eval" --log-level WARNING > "$OUT/logs/evaluate.json"
log "6/6 audit report, flagging at the threshold evaluate measured at 90% precision"
$R report --results "$OUT/matches" --output "$OUT/report" --truth "$OUT/sample/truth.csv" --log-level WARNING \
   --set "report.threshold={from_evaluation: $OUT/eval/metrics.json, precision: 0.9}" > "$OUT/logs/report.json"

.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/eval/metrics.json"))
s = json.load(open(f"{out}/report/summary.json"))
g = json.load(open(f"{out}/gallery_features/_manifest.json"))
q = json.load(open(f"{out}/matches/_manifest.json"))
f = json.load(open(f"{out}/logs/fit.json"))
print(f"\nfit: model {f['model_version']} fitted on {f['images_used']} gallery images (base {f['base_model_version']})")
print(f"gallery: {g['counts']['ok']} images encoded ({g['counts']['errors']} errors), model {g['model_version']} "
      f"(heads: {g['heads']})")
print(f"queries: {q['counts']['queries']} searched, {q['timings']['queries_per_s']} queries/s end to end")
print(f"evaluation ({m['thresholds']['score']}): recall@1 {m['recall@1']:.3f}, recall@10 {m['recall@10']:.3f}, "
      f"micro-AP {m['micro_ap']:.3f}; two-stage keeps {100 * m['exact']['kept_at_k']:.1f}% of the exact 512-d top-10")
c = s["counts"]
print(f"audit: {c['flagged_matches']} matches flagged on {c['flagged_queries']} of {c['queries']} queries at "
      f"{s['thresholds']['score']} >= {s['thresholds']['flag']:.4f}; report: {out}/report/report.html")
PY

cat <<MSG

Outputs under $OUT:
  sample/            gallery/ (real photos), queries/ (generated copies + non-matching photos), truth.csv,
                     background/ (unrelated photos for score normalisation)
  model/             fitted.pt, fitted.pt.card.md                 (retrieval fit)
  gallery_features/  part-*.parquet, errors/, _manifest.json      (retrieval extract; background_features/ too)
  index/             shard-*.index, _manifest.json                (retrieval index)
  matches/           part-*.parquet, query_features/, _manifest.json (retrieval search)
  eval/              metrics.json, pr_curve.png, _manifest.json   (retrieval evaluate)
  report/            report.html, full/ (full-size images), flagged.parquet, flagged.csv,
                     summary.json, _manifest.json (retrieval report)
MSG
