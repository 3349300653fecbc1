#!/usr/bin/env bash
# Set up the environment (idempotent) and run the pipeline end to end on the bundled sample with the
# one command for one's own images, `retrieval run` (Spark local[*], local files, the embedded defaults).
# Prints the figures the run measured and where the outputs are.
# Usage: scripts/demo.sh [OUT_DIR]   (default: ./demo_output)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
export SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$ROOT/.venv/bin/python"
OUT="$(mkdir -p "${1:-demo_output}" && cd "${1:-demo_output}" && pwd)"

printf '== sample: real photos (gallery), generated copies + unrelated photos (queries), truth.csv\n' >&2
.venv/bin/python -m retrieval.sample "$OUT/sample" >/dev/null
printf '== retrieval run: fit, extract, index, normalised search, evaluate, report (one Spark session)\n' >&2
.venv/bin/retrieval run --gallery "$OUT/sample/gallery" --queries "$OUT/sample/queries" \
  --background "$OUT/sample/background" --truth "$OUT/sample/truth.csv" --output "$OUT/run" \
  --log-level WARNING > "$OUT/run.json"

.venv/bin/python - "$OUT/run" <<'PY'
import json, os, sys
out = sys.argv[1]
read = lambda *p: json.load(open(os.path.join(out, *p)))
run, m, s = read("_manifest.json"), read("eval", "metrics.json"), read("report", "summary.json")
g, q = read("gallery_features", "_manifest.json"), read("results", "_manifest.json")
print(f"\nmodel {run['model_version']} (fitted on the gallery); gallery: {g['counts']['ok']} images encoded "
      f"({g['counts']['errors']} errors); queries: {q['counts']['queries']} searched")
print(f"evaluation ({m['thresholds']['score']}): recall@1 {m['recall@1']:.3f}, recall@10 {m['recall@10']:.3f}, "
      f"micro-AP {m['micro_ap']:.3f}")
c = s["counts"]
print(f"audit: {c['flagged_matches']} matches flagged on {c['flagged_queries']} of {c['queries']} queries at "
      f"{s['thresholds']['score']} >= {s['thresholds']['flag']:.4f}")
print(f"stages: " + ", ".join(f"{st['name']} {'skipped' if st['skipped'] else str(st.get('seconds')) + ' s'}"
                              for st in run["steps"]))
print(f"report: {run['report']}")
PY

cat <<MSG

Outputs under $OUT/run (each a stage's output with its _manifest.json; docs/guide.md has each one's contents):
  model/fitted.pt      the model fitted to the gallery          (retrieval fit)
  *_features/          gallery, query and background features  (retrieval extract)
  index/               the sharded IVF-PQ index                  (retrieval index)
  results/             match rows (Parquet)                      (retrieval search)
  eval/                metrics.json, pr_curve.png                (retrieval evaluate)
  report/              report.html, full/ (full-size images), flagged.csv, summary.json (retrieval report)
A rerun of the same command skips what is complete.
MSG
