"""What an index build leaves out of the index (NaN/inf and all-zero vectors, duplicate
``image_id``s): the manifest's ``skipped`` block, and the training sample without them."""
from __future__ import annotations

import numpy as np

from retrieval.index import dedup, idmap
from retrieval.index.reader import FeatureFile
from retrieval.index.quantizer import FileScan


def sample_of(scans: list[FileScan], dups: dedup.Duplicates, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The training sample (valid, non-duplicate rows) and its ids, in file order."""
    vecs, ids = [], []
    for s in sorted(scans, key=lambda s: s.file_no):
        if not len(s.sample_rows):
            continue
        keep = ~np.isin(s.sample_rows, dups.skip.get(s.file_no, np.zeros(0, np.int64)))
        vecs.append(s.sample[keep])
        ids.append(idmap.encode_ids(s.file_no, s.sample_rows[keep]))
    if not vecs:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.ascontiguousarray(np.concatenate(vecs)), np.concatenate(ids)


def _bad_examples(files: list[FeatureFile], scans: list[FileScan]) -> list[dict]:
    by_no = {f.file_no: f for f in files}
    out = []
    for s in scans:
        for row, reason in s.bad_rows:
            if len(out) < 20:
                out.append({"file_no": s.file_no, "file": by_no[s.file_no].url, "row": int(row),
                            "reason": reason})
    if out:
        urls = [f.url for f in sorted(files, key=lambda f: f.file_no)]
        first = min(f.file_no for f in files)
        ids = idmap.encode_ids(np.array([e["file_no"] - first for e in out]), np.array([e["row"] for e in out]))
        table = idmap.fetch_rows(urls, ids, ["image_id"])
        for e, image_id in zip(out, table.column("image_id").to_pylist()):
            e["image_id"] = image_id
    return out


def block(files: list[FeatureFile], scans: list[FileScan], dups: dedup.Duplicates, rule: str) -> dict:
    counts = {k: sum(getattr(s, k) for s in scans) for k in ("nan_inf", "zero", "renormalised")}
    return {**counts, "duplicates": dups.count if rule == "skip" else 0, "duplicates_found": dups.count,
            "duplicate_rule": rule,
            "examples": _bad_examples(files, scans) + [{"reason": "duplicate", **e} for e in dups.examples]}
