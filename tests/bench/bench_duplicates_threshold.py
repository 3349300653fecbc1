"""Choose ``duplicates.min_score`` and ``duplicates.max_fmr`` on the quality benchmark (docs/lifecycle.md).

Each split (/work/quality_data, tests/bench/quality_data.py) becomes a gallery with planted duplicates:
its gallery images plus its queries (edited copies of gallery images, and non-matching photos) as one
gallery. The truth: a copy belongs with its original (and with the other copies of it); a gallery image
or a non-matching photo with nothing else. ``retrieval duplicates`` runs once per split through the CLI
(the shipped model, ``search.normalize.background`` = the benchmark's background images, k 20); the
thresholds are then swept over its ``pairs/`` rows (``score`` for min_score, ``fmr_query`` for
max_fmr: a pair is kept when its false-match rate is at most max_fmr, what the stage's norm_score
threshold means), each with the groups recomputed (scipy connected components):

* pair precision: the kept pairs (unordered) whose two images belong together;
* copy recall: the copies in the same group as their original;
* F1 of the two; and ``same_source``: kept pairs counted false whose images are crops of one source
  photo (sources.json; a copy's source is its original's), near-duplicates the truth does not name.

The defaults are the thresholds with the highest copy recall at a pair precision of at least 0.9 on
TUNE (a false pair joins two unrelated groups, so precision is held high); TEST is reported.

    PYTHONPATH=$PWD python tests/bench/bench_duplicates_threshold.py [--data /work/quality_data] [--work /tmp/x]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MIN_SCORES = [round(x, 2) for x in np.arange(0.50, 0.96, 0.025)]
MAX_FMRS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "retrieval.cli", *args]
    print("+", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


PRECISION = 0.9


def sources(data: str) -> dict[str, int]:
    """Each image's source photo (a number), from sources.json."""
    with open(os.path.join(data, "sources.json")) as fh:
        s = json.load(fh)
    out: dict[str, int] = {}
    for i, src in enumerate(v for vals in s.values() if isinstance(vals, list) for v in vals if isinstance(v, dict)):
        for img in src.get("images") or []:
            out[stem(img)] = i
    return out


def prepare(data: str, split: str, work: str) -> tuple[str, dict[str, str], set[str]]:
    """The split's duplicates output URL, each image's true label, and the copies' ids."""
    root = os.path.join(work, split)
    imgs = os.path.join(root, "images")
    os.makedirs(imgs, exist_ok=True)
    for sub in ("gallery", "queries"):
        for name in sorted(os.listdir(os.path.join(data, split, sub))):
            link = os.path.join(imgs, name)
            if not os.path.exists(link):
                os.symlink(os.path.join(data, split, sub, name), link)
    label, copies = {}, set()
    for name in os.listdir(os.path.join(data, split, "gallery")):
        label[os.path.splitext(name)[0]] = os.path.splitext(name)[0]
    with open(os.path.join(data, split, "truth.csv")) as fh:
        for row in csv.DictReader(fh):
            label[row["query_id"]] = row["gallery_id"] or row["query_id"]
            if row["gallery_id"]:
                copies.add(row["query_id"])
    bg = os.path.join(work, "background_features")
    if not os.path.exists(os.path.join(bg, "_manifest.json")):
        cli("extract", "--input", os.path.join(data, "background"), "--output", bg, "--role", "gallery",
            "--engine", "local")
    feats, idx, out = (os.path.join(root, n) for n in ("features", "index", "duplicates"))
    if not os.path.exists(os.path.join(out, "_manifest.json")):
        cli("extract", "--input", imgs, "--output", feats, "--role", "gallery", "--engine", "local")
        cli("index", "--features", feats, "--output", idx, "--engine", "local")
        cli("duplicates", "--index", idx, "--output", out, "--engine", "local",
            "--set", f"search.normalize.background={bg}", "--set", "duplicates.k=20")
    return out, label, copies


def stem(image_id: str) -> str:
    return os.path.splitext(os.path.basename(image_id))[0]


def evaluate(pairs: dict, label: dict[str, str], copies: set[str], column: str, keep, source=None) -> dict:
    mask = keep(pairs[column]) & (pairs["a"] != pairs["b"])
    a, b = pairs["a"][mask], pairs["b"][mask]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    edges = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
    names = pairs["names"]
    lab = np.array([label[names[i]] for i in range(len(names))])
    true = int((lab[edges[:, 0]] == lab[edges[:, 1]]).sum()) if len(edges) else 0
    src = np.array([(source or {}).get(lab[i], -1 - i) for i in range(len(names))])
    same = int(((src[edges[:, 0]] == src[edges[:, 1]]) & (lab[edges[:, 0]] != lab[edges[:, 1]])).sum()) \
        if len(edges) else 0
    n = len(names)
    g = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)) if len(edges) else \
        coo_matrix((n, n))
    _, comp = connected_components(g, directed=False)
    pos = {nm: i for i, nm in enumerate(names)}
    found = sum(1 for c in copies if comp[pos[c]] == comp[pos[label[c]]])
    sizes = np.bincount(comp)
    precision = true / len(edges) if len(edges) else 1.0
    recall = found / len(copies)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pairs": len(edges), "same_source": same, "precision": round(precision, 4), "copy_recall": round(recall, 4),
            "f1": round(f1, 4), "groups": int((sizes >= 2).sum()), "largest": int(sizes.max())}


def load_pairs(out: str) -> dict:
    t = pq.read_table(os.path.join(out, "pairs"), columns=["query_id", "gallery_id", "score", "fmr_query"])
    q = [stem(x) for x in t.column("query_id").to_pylist()]
    g = [stem(x) for x in t.column("gallery_id").to_pylist()]
    names = sorted(set(q) | set(g))
    pos = {nm: i for i, nm in enumerate(names)}
    return {"names": names, "a": np.array([pos[x] for x in q]), "b": np.array([pos[x] for x in g]),
            "score": t.column("score").to_numpy(zero_copy_only=False),
            "fmr_query": t.column("fmr_query").to_numpy(zero_copy_only=False)}


def sweep(out: str, label: dict, copies: set, source: dict | None = None) -> dict:
    pairs = load_pairs(out)
    missing = set(label) - set(pairs["names"])
    if missing:
        raise SystemExit(f"{len(missing)} images not in the duplicates output, e.g. {sorted(missing)[:3]}")
    return {"min_score": {t: evaluate(pairs, label, copies, "score", lambda s, t=t: s >= t, source) for t in MIN_SCORES},
            "max_fmr": {t: evaluate(pairs, label, copies, "fmr_query", lambda f, t=t: np.nan_to_num(f, nan=1.0) <= t,
                                        source)
                        for t in MAX_FMRS}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/quality_data")
    ap.add_argument("--work", default="/tmp/bench-duplicates-threshold")
    args = ap.parse_args()
    res = {}
    for split in ("tune", "test"):
        out, label, copies = prepare(args.data, split, args.work)
        res[split] = sweep(out, label, copies, sources(args.data))
        print(f"{split}: {len(label)} images, {len(copies)} copies", flush=True)
    best = {k: max((t for t, v in res["tune"][k].items() if v["precision"] >= PRECISION),
                   key=lambda t: (res["tune"][k][t]["copy_recall"], t if k == "min_score" else -t))
            for k in ("min_score", "max_fmr")}
    for k in ("min_score", "max_fmr"):
        print(f"\n{k}: chosen on tune = {best[k]:g}")
        print(f"| {k} | tune pairs | tune precision | tune copy recall | tune F1 | test pairs | test precision "
              f"| test copy recall | test F1 | test groups | test same-source |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for t in res["tune"][k]:
            a, b = res["tune"][k][t], res["test"][k][t]
            mark = " **chosen**" if t == best[k] else ""
            print(f"| {t:g}{mark} | {a['pairs']} | {a['precision']:.3f} | {a['copy_recall']:.3f} | {a['f1']:.3f} | "
                  f"{b['pairs']} | {b['precision']:.3f} | {b['copy_recall']:.3f} | {b['f1']:.3f} | {b['groups']} | "
                  f"{b['same_source']} |")
    with open(os.path.join(args.work, "results.json"), "w") as fh:
        json.dump({"chosen": best, "results": {s: {k: {str(t): v for t, v in r.items()} for k, r in d.items()}
                                                for s, d in res.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
