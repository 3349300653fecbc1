"""Reading a built index: manifest, trained part, shards (sha256-verified), merged on-disk index.

Layout of an index directory (docs/index.md)::

    _manifest.json           written LAST: parameters, feature files, shards, quality, sha256s
                             (indexes built before 0.2: manifest.json, still read)
    trained.index            the empty trained index (quantizer + codebooks), stored once
    shard-NNNNN.index        inverted lists (codes + int64 ids) with an empty quantizer
    _shards/shard-NNNNN.json per-shard completion markers (resume)
    _trained.json            marker of trained.index (resume)
    merged.index + merged.ivfdata   only with --merge-ondisk

:func:`load_shard` returns a faiss index that is directly searchable (``index.search(x, k)``
gives the gallery int64 ids); every shard loaded in a process shares one deserialised trained
quantizer (cached per index URL and sha256).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import faiss
import numpy as np

from retrieval import fsio, outputs
from retrieval.engine import task_error
from retrieval.index.shard import attach
from retrieval.index.quantizer import deserialize

TRAINED = "trained.index"

_CACHE: "OrderedDict[tuple, faiss.Index]" = OrderedDict()
_LOCK = threading.Lock()
_CACHE_SIZE = 2


@task_error
class IndexIntegrityError(ValueError):
    """An index file is missing or does not match the sha256 in the manifest."""


def manifest_url(index_url: str) -> str:
    """Where the index's marker is (``_manifest.json``, or the pre-0.2 ``manifest.json``), for messages."""
    return outputs.marker_of(index_url, "index") or outputs.marker_url(index_url)


def read_index_manifest(index_url: str) -> dict:
    """The manifest of a COMPLETE index (clear error if missing, unreadable or incomplete)."""
    manifest = outputs.read(index_url, "index", hint="; build it with 'retrieval index'")
    missing = [k for k in ("index_key", "trained", "shards", "feature_files", "nprobe") if k not in manifest]
    if missing:
        raise ValueError(f"{manifest_url(index_url)}: not a complete index manifest (missing keys {missing})")
    return manifest


def feature_file_urls(manifest: dict) -> list[str]:
    """The URL of every feature file, by ``file_no`` (for ``idmap.fetch_rows``)."""
    files = sorted(manifest["feature_files"], key=lambda f: f["file_no"])
    if [f["file_no"] for f in files] != list(range(len(files))):
        raise ValueError("index manifest: feature_files are not numbered 0..n-1")
    return [f["url"] for f in files]


def _read_verified(url: str, sha256: str | None, verify: bool, what: str) -> bytes:
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise IndexIntegrityError(f"{what} {url} is missing") from None
    if verify and sha256 and fsio.sha256_bytes(data) != sha256:
        raise IndexIntegrityError(f"{what} {url} does not match the sha256 in the index manifest "
                                  "(truncated or altered)")
    return data


def load_trained(index_url: str, manifest: dict, verify: bool = True) -> faiss.Index:
    """The empty trained index, deserialised once per process (shared: do not modify it)."""
    entry = manifest["trained"]
    key = (index_url.rstrip("/"), entry["sha256"])
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    data = _read_verified(fsio.join(index_url, fsio.safe_relpath(entry["file"])), entry["sha256"], verify,
                          "trained index")
    index = deserialize(data)
    with _LOCK:
        _CACHE[key] = index
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return index


def load_shard(index_url: str, shard_no: int, manifest: dict, verify: bool = True) -> faiss.Index:
    """Shard ``shard_no`` as a searchable faiss index (ids: gallery int64 ids), its file checked
    against the manifest's sha256; nprobe set to the manifest's default."""
    shards = manifest["shards"]
    if not 0 <= shard_no < len(shards):
        raise IndexError(f"shard {shard_no}: the index has {len(shards)} shards")
    entry = shards[shard_no]
    data = _read_verified(fsio.join(index_url, fsio.safe_relpath(entry["file"])), entry["sha256"], verify,
                          "index shard")
    trained = load_trained(index_url, manifest, verify)
    try:
        index = attach(trained, deserialize(data))
    except Exception as exc:
        raise IndexIntegrityError(f"index shard {fsio.join(index_url, entry['file'])} is not readable: "
                                  f"{exc}") from exc
    if verify and int(index.ntotal) != int(entry["ntotal"]):
        raise IndexIntegrityError(f"index shard {entry['file']} holds {index.ntotal} vectors, the "
                                  f"manifest says {entry['ntotal']}")
    set_nprobe(index, int(manifest.get("nprobe", 1)))
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = max(1, min(int(nprobe), ivf.nlist))


def search_shards(index_url: str, x: np.ndarray, k: int, nprobe: int | None = None,
           manifest: dict | None = None, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Search every shard, one at a time, and merge: ``(scores, ids)`` of the global top ``k``
    (ties broken by the smaller id). For checks and small jobs; the search stage distributes it."""
    from retrieval.index.quality import _topk

    manifest = manifest or read_index_manifest(index_url)
    x = np.ascontiguousarray(x, dtype=np.float32)
    best_s = np.full((len(x), k), -np.inf, np.float32)
    best_i = np.full((len(x), k), -1, np.int64)
    for shard_no in range(len(manifest["shards"])):
        index = load_shard(index_url, shard_no, manifest, verify)
        set_nprobe(index, nprobe or int(manifest["nprobe"]))
        s, i = index.search(x, k)
        best_s, best_i, _ = _topk(np.concatenate([best_s, s], axis=1),
                                  np.concatenate([best_i, i], axis=1), k)
    return best_s, best_i


def search(*args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Deprecated until 0.3: the old name of :func:`search_shards` (the search stage is
    :func:`retrieval.search.job.search`)."""
    import warnings

    warnings.warn("retrieval.index.store.search is deprecated and will be removed in 0.3: use "
                  "retrieval.index.store.search_shards", FutureWarning, stacklevel=2)
    return search_shards(*args, **kwargs)


def load_merged(index_url: str, manifest: dict | None = None, verify: bool = True) -> faiss.Index:
    """The single on-disk index written by ``--merge-ondisk`` (memory-mapped; local output only)."""
    manifest = manifest or read_index_manifest(index_url)
    merged = manifest.get("merged")
    if not merged:
        raise FileNotFoundError(f"{index_url}: no merged on-disk index (build with --merge-ondisk)")
    _, root = fsio.url_to_fs(index_url)
    if fsio.protocol_of(index_url) not in ("file", "local"):
        raise ValueError(f"{index_url}: an on-disk index is served from a local directory")
    for key in ("index", "ivfdata"):
        url = fsio.join(index_url, merged[key])
        if not fsio.exists(url):
            raise IndexIntegrityError(f"merged index file {url} is missing")
        if verify and fsio.sha256_file(url) != merged[key + "_sha256"]:
            raise IndexIntegrityError(f"merged index file {url} does not match the sha256 in the "
                                      "index manifest (truncated or altered)")
    index = faiss.read_index(f"{root.rstrip('/')}/{merged['index']}",
                             faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    set_nprobe(index, int(manifest["nprobe"]))
    return index
