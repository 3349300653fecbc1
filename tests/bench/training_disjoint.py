"""Check that the training photos share no source photo with the quality benchmark, and count them.

    .venv/bin/python tests/bench/training_disjoint.py [--data /work/quality_data] [--max-hamming 10]

Reads every source photo of the benchmark (``sources.json``: plain files, members of gcompris'
resource archives, JPEG streams of PDF manuals; the copies under ``--data`` are not needed), and
every photo :func:`retrieval.train.sources.training_photos` keeps; compares them by sha256 and by
the Hamming distance of their 64-bit dHash (a resized, recompressed or slightly edited copy of a
photo stays within a few bits), confirmed by the correlation of 16 x 16 grey thumbnails (an 8 x 8
dHash alone pairs unrelated dark or low-detail pictures: night skies, asphalt). Prints a JSON summary: training photos per package (distinct source
photos: ``training_photos`` already drops exact and near duplicates), benchmark sources read, the
pairs closer than ``--max-hamming`` bits (for review) and the matches. Exit status 1 when a training
photo has the sha256 of a benchmark source, or a dHash within ``--exact-hamming`` bits and a
thumbnail correlation of at least ``--min-corr``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import warnings

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from quality_data import read_bytes  # noqa: E402

from retrieval.train.sources import dhash, summary, training_photos  # noqa: E402


def _hashes(raw: bytes) -> tuple[int, np.ndarray] | None:
    """(dHash, the zero-mean unit-norm 16 x 16 grey thumbnail) of an encoded image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as im:
                im.draft("RGB", (256, 256))
                rgb = im.convert("RGB")
    except Exception:  # noqa: BLE001 - an unreadable source is reported, not fatal
        return None
    thumb = np.asarray(rgb.convert("L").resize((16, 16), Image.BOX), np.float64).ravel()
    thumb -= thumb.mean()
    return dhash(rgb), thumb / (np.linalg.norm(thumb) or 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/quality_data")
    ap.add_argument("--max-hamming", type=int, default=10, help="report pairs at most this far apart")
    ap.add_argument("--exact-hamming", type=int, default=4, help="fail on pairs at most this far apart")
    ap.add_argument("--min-corr", type=float, default=0.9, help="thumbnail correlation of a match")
    ap.add_argument("--packages", nargs="*", default=None, help="only these training packages")
    args = ap.parse_args(argv)
    t0 = time.time()
    with open(os.path.join(args.data, "sources.json")) as fh:
        bench = json.load(fh)["sources"]
    bench_sha, bench_hash, unreadable = {}, [], []
    for s in bench:
        bench_sha[s["sha256"]] = s["path"]
        try:
            h = _hashes(read_bytes(s["path"]))
        except OSError:
            h = None
        if h is None:
            unreadable.append(s["path"])
        else:
            bench_hash.append((*h, s["path"]))
    photos = training_photos(packages=args.packages)
    close, exact = [], []
    for p in photos:
        with open(p.path, "rb") as fh:
            raw = fh.read()
        if hashlib.sha256(raw).hexdigest() in bench_sha:
            exact.append({"train": p.path, "bench": bench_sha[p.sha256], "by": "sha256"})
            continue
        h = _hashes(raw)
        if h is None:
            continue
        for b, thumb, path in bench_hash:
            d = bin(h[0] ^ b).count("1")
            if d <= args.max_hamming:
                corr = round(float(h[1] @ thumb), 3)
                close.append({"train": p.path, "bench": path, "hamming": d, "corr": corr})
                if d <= args.exact_hamming and corr >= args.min_corr:
                    exact.append({"train": p.path, "bench": path, "by": f"dhash {d} bits, corr {corr}"})
    out = {"training": summary(photos), "benchmark_sources": len(bench), "benchmark_read": len(bench_hash),
           "benchmark_unreadable": unreadable[:20], "close_pairs": close, "matches": exact,
           "seconds": round(time.time() - t0, 1)}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 1 if exact else 0


if __name__ == "__main__":
    sys.exit(main())
