"""The files of an index directory that the build writes besides the shards: a complete index
already there, the trained index and its marker, removing stale files, and the optional merged
on-disk index (``--merge-ondisk``)."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from retrieval import fsio, outputs
from retrieval.index.params import IndexParams
from retrieval.index.reader import FeatureInputError
from retrieval.index.store import TRAINED, read_index_manifest
from retrieval.index.quantizer import deserialize, serialize, set_threads, train_index

log = logging.getLogger(__name__)

TRAINED_MARKER = "_trained.json"
MERGED_INDEX, MERGED_DATA = "merged.index", "merged.ivfdata"


def remove(output_url: str, names: Sequence[str]) -> None:
    fs, root = fsio.url_to_fs(output_url)
    for name in names:
        p = f"{root.rstrip('/')}/{name}"
        if fs.exists(p):
            fs.rm(p, recursive=True)


def index_files(output_url: str) -> list[str]:
    fs, root = fsio.url_to_fs(output_url)
    if not fs.exists(root):
        return []
    out = []
    for p in fs.ls(root, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(("shard-", ".tmp-", "compact-")) or base in (
                outputs.MARKER, *outputs.LEGACY_MARKERS.values(), TRAINED, TRAINED_MARKER, "_shards",
                MERGED_INDEX, MERGED_DATA, "features"):       # compact-K/, features/: retrieval index --compact
            out.append(base)
    return out


def existing(output_url: str, mode: str, build_fp: str) -> dict | None:
    """A complete index already at ``output_url``: returned when it is this very build, removed with
    ``mode=overwrite``, refused otherwise."""
    marker = outputs.marker_of(output_url, "index")
    if marker is None:
        return None
    existing = read_index_manifest(output_url)
    if mode == "overwrite":
        log.info("index.mode=overwrite: removing the index at %s", output_url)
        remove(output_url, [outputs.MARKER, *outputs.LEGACY_MARKERS.values()])
        remove(output_url, index_files(output_url))
        return None
    if existing.get("fingerprint") == build_fp:
        log.info("%s is already complete for these inputs and settings: nothing to do", output_url)
        if marker != outputs.marker_url(output_url):
            existing = outputs.commit(output_url, "index", existing)      # the marker's pre-0.2 name
        return existing
    raise FileExistsError(f"{output_url} already holds a complete index built from other inputs or settings; "
                          "add to it with --append, or rebuild with --set index.mode=overwrite")


def train_or_reuse(output_url: str, params: IndexParams, sample: np.ndarray, fingerprint: str, index_cfg
                    ) -> tuple[bytes, int]:
    """``(trained index bytes, training sample size)``: reused from an interrupted run with the
    same fingerprint (training is not bit-reproducible across thread counts), else trained now."""
    trained_url, marker_url = fsio.join(output_url, TRAINED), fsio.join(output_url, TRAINED_MARKER)
    if index_cfg["mode"] == "incremental" and fsio.exists(marker_url) and fsio.exists(trained_url):
        marker = fsio.read_json(marker_url)
        data = fsio.read_bytes(trained_url)
        if marker.get("fingerprint") == fingerprint and marker.get("sha256") == fsio.sha256_bytes(data):
            log.info("reusing %s from an earlier run", trained_url)
            return data, int(marker.get("train_size", len(sample)))
    if len(sample) < params.nlist:
        raise FeatureInputError(f"{len(sample)} valid training vectors for {params.nlist} cells")
    set_threads(index_cfg["threads"])
    data = serialize(train_index(params, sample, int(index_cfg["seed"])))
    fsio.remove_stale(output_url, "shard", ("_shards",), keep=set())  # shards of another quantizer are useless
    fsio.write_bytes(trained_url, data)
    fsio.write_json(marker_url, {"fingerprint": fingerprint, "sha256": fsio.sha256_bytes(data),
                                 "train_size": len(sample), "index_key": params.index_key})
    return data, len(sample)


def merge_ondisk(output_url: str, trained_data: bytes, shard_files: list[str]) -> dict:
    """All shards -> one on-disk index (``merged.index`` + ``merged.ivfdata``), faiss's
    ``merge_ondisk``: inverted lists are memory-mapped, never all in RAM."""
    from faiss.contrib.ondisk import merge_ondisk as faiss_merge_ondisk

    import faiss

    if fsio.protocol_of(output_url) not in ("file", "local"):
        raise ValueError(f"--merge-ondisk needs a local output directory (an on-disk index is served "
                         f"from a local disk), got {output_url}")
    _, root = fsio.url_to_fs(output_url)
    root = root.rstrip("/")
    tmp = f"{root}/.tmp-merge"
    remove(output_url, [".tmp-merge"])
    os.makedirs(tmp)
    trained = deserialize(trained_data)
    faiss_merge_ondisk(trained, [f"{root}/{f}" for f in shard_files], f"{tmp}/{MERGED_DATA}")
    faiss.write_index(trained, f"{tmp}/{MERGED_INDEX}")
    ntotal = int(trained.ntotal)
    del trained
    for name in (MERGED_DATA, MERGED_INDEX):  # same basenames: IO_FLAG_ONDISK_SAME_DIR finds the data
        os.replace(f"{tmp}/{name}", f"{root}/{name}")
    os.rmdir(tmp)
    return {"index": MERGED_INDEX, "ivfdata": MERGED_DATA, "ntotal": ntotal,
            "index_sha256": fsio.sha256_file(f"{root}/{MERGED_INDEX}"),
            "ivfdata_sha256": fsio.sha256_file(f"{root}/{MERGED_DATA}"),
            "bytes": os.path.getsize(f"{root}/{MERGED_INDEX}") + os.path.getsize(f"{root}/{MERGED_DATA}")}
