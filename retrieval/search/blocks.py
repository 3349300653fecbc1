"""Gallery-major rerank (``search.rerank: gallery``): each gallery block is read once per run.

The chunk-major rerank (``chunk``) reads, for every query chunk, the gallery row groups its
shortlists touch, through a per-process cache of ``search.vector_cache_mb``. When the gallery's fine
column is larger than that cache and there are several chunks, every chunk reads most of the column
again (at a billion images all of it: chunks x 516 GB). The gallery-major plan turns the rerank's
loop around - as faiss's ``big_batch_search`` does for a one-stage search - and keeps the
cascade's semantics:

1. coarse search and merge as before: each chunk's global top S, merged across shards FIRST;
2. :func:`route`: the chunk's (query, candidate) pairs are split by the gallery **block** that
   holds the candidate. Blocks (:func:`plan_blocks`) are runs of consecutive row groups of the
   feature files, packed up to ``search.vector_cache_mb`` of decoded fine vectors;
3. :func:`block_task`: one task per block reads the block's touched row groups once, scores every
   pair routed to it with the rerank's kernel (the query vectors of each chunk are read once per
   process while they fit :data:`QUERY_CACHE_BYTES`), and keeps, per query, its ``k`` best pairs
   in the block by (score desc, id asc), the rerank's order: a pair dropped there has ``k`` better
   ones in the same query, so it cannot be in the query's top k;
4. :func:`assemble`: the pieces of one chunk from every block go back to their positions in the
   chunk's ``nq x S`` shortlist, and the chunk-major rerank's own selection
   (:func:`~retrieval.search.rerank.select`) picks the top k: the result rows are identical.

Records between the tasks are tuples of numpy arrays (Spark shuffles them; the local engine passes
them in memory): :class:`Routed` to a block (16 bytes a pair), :class:`Piece` back to a chunk
(20 bytes a kept pair). Every chunk gets one Piece without pairs carrying its coarse-stage
figures, so each chunk's task runs even when no block has a pair of it. A block task holds its
block (<= the budget), the pairs routed to it, one chunk's query vectors and a chunk-sized score
buffer.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from retrieval.index import idmap
from retrieval.search import rerank as rerank_mod
from retrieval.search.coarse import lru_cached
from retrieval.search.kernels import group_pairs
from retrieval.search.vectors import VectorCache, labels_by_file, read_groups_into

QUERY_CACHE_BYTES = 256 << 20      # query vectors (float32) of chunks kept per process


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of feature file ``file_no`` (whole row groups)."""
    file_no: int
    start: int
    stop: int

    @property
    def first_id(self) -> int:
        """The gallery id of the segment's first row (ids order as (file, row))."""
        return int(idmap.encode_ids(self.file_no, np.array([self.start]))[0])

    @property
    def end_id(self) -> int:
        return int(idmap.encode_ids(self.file_no, np.array([self.stop]))[0])


@dataclass(frozen=True)
class Block:
    block: int
    segments: tuple[Segment, ...]
    decoded_bytes: int              # the fine vectors (+ scales) of all its rows, decoded


class Routed(NamedTuple):
    """The pairs of one chunk whose candidate lies in one block (or, with ``meta``, none)."""
    chunk: int
    pos: np.ndarray        # int32: position in the chunk's flat nq x S shortlist
    gid: np.ndarray        # int64: gallery id (file_no << 32 | row)
    coarse: np.ndarray     # float32: coarse score
    meta: dict | None = None
    qrows: np.ndarray | None = None   # list blocks: the chunk rows of the queries with pairs here
    queries: Any = None               # ... and their stored fine vectors (pa.Table: fine, fine_scale)


class Piece(NamedTuple):
    """A block's kept pairs of one chunk, scored; or (``block`` -1) a chunk's or block's figures."""
    block: int
    pos: np.ndarray        # int32
    gid: np.ndarray        # int64
    fine: np.ndarray       # float32: exact fine score
    coarse: np.ndarray     # float32
    meta: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.pos, self.gid, self.fine, self.coarse))


def _empty(kind: type) -> tuple:
    return (np.zeros(0, np.int32), np.zeros(0, np.int64)) + tuple(
        np.zeros(0, np.float32) for _ in range(2 if kind is Piece else 1))


def plan_blocks(cache: VectorCache, feature_files: Sequence[str], versions: Sequence[str | None] | None,
                expected_rows: Sequence[int | None] | None, budget_bytes: int) -> list[Block]:
    """The gallery split into blocks of consecutive row groups (in file order, files packed
    together) of at most ``budget_bytes`` decoded fine vectors each (one row group at least). Reads
    the files' footers; a file whose row count differs from ``expected_rows`` is refused."""
    blocks: list[Block] = []
    segs: list[Segment] = []
    size = 0

    def close() -> None:
        nonlocal segs, size
        if segs:
            blocks.append(Block(len(blocks), tuple(segs), size))
        segs, size = [], 0

    for f, url in enumerate(feature_files):
        ft = cache.footer(url, versions[f] if versions is not None else None)
        expected = expected_rows[f] if expected_rows is not None else None
        if expected is not None and ft.num_rows != expected:
            raise ValueError(f"gallery feature file {url} has {ft.num_rows} rows but the index manifest "
                             f"says {expected}: the file was replaced or truncated after indexing")
        g0 = 0
        for g, nbytes in enumerate(np.diff(ft.starts) * ft.row_bytes):     # decoded bytes per row group
            if size + nbytes > budget_bytes and (segs or g > g0):
                if g > g0:
                    segs.append(Segment(f, int(ft.starts[g0]), int(ft.starts[g])))
                close()
                g0 = g
            size += int(nbytes)
        if len(ft.starts) > 1:
            segs.append(Segment(f, int(ft.starts[g0]), int(ft.starts[-1])))
    close()
    return blocks


class BlockMap:
    """Gallery id -> block, by the first id of every segment (ids order as (file, row))."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        segs = [(s, b.block) for b in blocks for s in b.segments]
        self.first = np.array([s.first_id for s, _ in segs], np.int64)
        self.last = np.array([s.end_id for s, _ in segs], np.int64)
        self.block = np.array([b for _, b in segs], np.int64)
        self.n_blocks = max(1, len(blocks))

    def __call__(self, gid: np.ndarray) -> np.ndarray:
        seg = np.searchsorted(self.first, gid, side="right") - 1
        bad = (seg < 0) | (gid >= self.last[np.maximum(seg, 0)])
        if bad.any():
            f, r = idmap.decode_ids(gid[bad][:1])
            raise KeyError(f"shortlist id refers to row {int(r[0])} of feature file #{int(f[0])}, "
                           "which the index's feature files do not have")
        return self.block[seg]


def route(chunk: int, ids: np.ndarray, coarse: np.ndarray, block_of: BlockMap, meta: dict
          ) -> Iterator[tuple[int, Routed]]:
    """``(block, Routed)`` for every block holding candidates of the chunk's merged shortlist
    (``ids``/``coarse``: ``nq x S``), pairs in (file, row) order inside each; and the chunk's
    ``meta`` (its coarse-stage figures) to one block, to be passed on to the chunk's task."""
    pos, files, rows = group_pairs(ids.ravel(), rerank_mod.LOCALITY_SHIFT)
    gid = idmap.encode_ids(files, rows)
    blk = block_of(gid) if len(gid) else np.zeros(0, np.int64)
    order = np.argsort(blk, kind="stable")
    pos, gid, blk = pos[order].astype(np.int32), gid[order], blk[order]
    flat_coarse = coarse.ravel()
    bounds = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1], True]) if len(blk) else np.zeros(1, np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(blk[a]), Routed(chunk, pos[a:b], gid[a:b], flat_coarse[pos[a:b]].astype(np.float32))
    yield chunk % block_of.n_blocks, Routed(chunk, *_empty(Routed), meta=meta)


def keep_topk(pos: np.ndarray, gid: np.ndarray, fine: np.ndarray, width: int, k: int) -> np.ndarray:
    """Indices of the pairs that are among their query's ``k`` best (fine desc, id asc)."""
    q = pos // width
    if len(q) == 0 or np.bincount(q).max() <= k:         # no query has more than k: all kept
        return np.arange(len(q))
    order = np.lexsort((gid, -fine, q))
    qs = q[order]
    first = np.r_[0, np.flatnonzero(qs[1:] != qs[:-1]) + 1]
    rank = np.arange(len(qs)) - np.repeat(first, np.diff(np.r_[first, len(qs)]))
    return np.sort(order[rank < k])


_QUERIES: "OrderedDict[tuple, tuple[np.ndarray, int]]" = OrderedDict()


def cached_queries(key: tuple, load: Callable[[], tuple[np.ndarray, int]]
                   ) -> tuple[tuple[np.ndarray, int], bool]:
    """A chunk's ``(float32 query vectors, bytes read)`` from ``load()``, loaded at most once per
    process while the most recent ones fit :data:`QUERY_CACHE_BYTES`; and whether it was loaded
    now."""
    fresh: list[bool] = []

    def compute() -> tuple[np.ndarray, int]:
        fresh.append(True)
        return load()

    value = lru_cached(_QUERIES, key, compute,
                       lambda c: sum(v[0].nbytes for v in c.values()) > QUERY_CACHE_BYTES, "query vectors",
                       logging.DEBUG)      # a block task streams every chunk: evictions are routine
    return value, bool(fresh)


def read_block(block: Block, rows_by_segment: Sequence[np.ndarray], feature_files: Sequence[str],
               versions: Sequence[str | None] | None, cache: VectorCache, threads: int
               ) -> tuple[list[tuple[np.ndarray | None, np.ndarray | None]], dict]:
    """The block's touched row groups (those holding one of ``rows_by_segment[i]``, file rows of
    segment i), decoded into one array per segment (rows relative to the segment's start; rows of
    groups not read are unspecified); and the read's figures."""
    out, stats = [], {"row_groups": 0, "bytes_read": 0, "bytes_decoded": 0}
    for seg, rows in zip(block.segments, rows_by_segment):
        url = feature_files[seg.file_no]
        ft = cache.footer(url, versions[seg.file_no] if versions is not None else None)
        groups = ft.groups_of(rows, url) if len(rows) else np.zeros(0, np.int64)
        if not len(groups):
            out.append((None, None))
            continue
        n, arr, lock = seg.stop - seg.start, [], threading.Lock()

        def targets(dtype, dim: int, arr=arr, n=n, has_scale=ft.has_scale, lock=lock):
            with lock:                      # the segment's arrays, allocated once (lazily backed)
                if not arr:
                    arr += [np.empty((n, dim), dtype), np.empty(n, np.float32) if has_scale else None]
            return arr[0], arr[1]

        stats["bytes_decoded"] += read_groups_into(url, ft, groups.tolist(), targets, seg.start, threads)
        stats["row_groups"] += len(groups)
        stats["bytes_read"] += int(ft.stored[groups].sum())
        out.append((arr[0], arr[1]))
    return out, stats


def block_task(block: Block, items: Iterable[Routed], feature_files: Sequence[str],
               versions: Sequence[str | None] | None, width: int, k: int,
               query_fine: Callable[[int], tuple[np.ndarray, int]], threads: int,
               cache: VectorCache, n_chunks: int = 1) -> Iterator[tuple[int, Piece]]:
    """Score every pair routed to ``block`` (its rows read once), keep each query's ``k`` best
    per chunk: ``(chunk, Piece)`` records; chunk metas pass through; the block's own figures go
    to chunk ``block % n_chunks``."""
    t0 = time.monotonic()
    items = list(items)
    metas = [it for it in items if it.meta is not None]
    pairs = [it for it in items if it.meta is None]
    seg_first = np.array([s.first_id for s in block.segments], np.int64)
    gids = np.concatenate([it.gid for it in pairs]) if pairs else np.zeros(0, np.int64)
    seg_of = np.searchsorted(seg_first, gids, side="right") - 1
    _, all_rows = idmap.decode_ids(gids)
    data, stats = read_block(block, [all_rows[seg_of == i] for i in range(len(block.segments))],
                             feature_files, versions, cache, threads)
    t_read = time.monotonic() - t0
    score_s = query_bytes = 0.0
    out_bytes = kept = 0
    scratch = np.empty(0, np.float32)
    for it in pairs:
        t = time.monotonic()
        q, nbytes = query_fine(it.chunk)
        query_bytes += nbytes
        if scratch.size < q.shape[0] * width:
            scratch = np.empty(q.shape[0] * width, np.float32)
        s_of = np.searchsorted(seg_first, it.gid, side="right") - 1
        _, rows = idmap.decode_ids(it.gid)
        for i, seg in enumerate(block.segments):
            sel = np.flatnonzero(s_of == i) if len(block.segments) > 1 else slice(None)
            codes, scales = data[i]
            if codes is None:
                continue
            rerank_mod.score_pairs_into(scratch, q, it.pos[sel].astype(np.int64), width, codes,
                                        rows[sel] - seg.start, scales, threads)
        fine = scratch[it.pos]
        keep = keep_topk(it.pos, it.gid, fine, width, k)
        piece = Piece(block.block, it.pos[keep], it.gid[keep], fine[keep], it.coarse[keep])
        out_bytes += piece.nbytes
        kept += len(keep)
        score_s += time.monotonic() - t
        yield it.chunk, piece
    for it in metas:
        yield it.chunk, Piece(-1, *_empty(Piece), meta={"chunk": it.meta})
    stats.update({"block": block.block, "pairs": int(len(gids)), "pairs_kept": kept,
                  "shuffle_bytes": out_bytes, "query_bytes_read": int(query_bytes),
                  "read_s": round(t_read, 4), "score_s": round(score_s, 4)})
    yield block.block % max(1, n_chunks), Piece(-1, *_empty(Piece), meta={"block": stats})


def assemble(pieces: Iterable[Piece], nq: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                    list[dict], list[dict]]:
    """A chunk's scored shortlist from its pieces: ``(fine, ids, coarse)`` (``nq x width``;
    positions no block returned: fine -inf, id -1, coarse NaN), its chunk metas, block metas."""
    fine = np.full(nq * width, -np.inf, np.float32)
    ids = np.full(nq * width, -1, np.int64)
    coarse = np.full(nq * width, np.nan, np.float32)
    chunk_meta, block_meta = [], []
    for p in pieces:
        if p.meta is not None:
            (chunk_meta if "chunk" in p.meta else block_meta).append(next(iter(p.meta.values())))
            continue
        fine[p.pos], ids[p.pos], coarse[p.pos] = p.fine, p.gid, p.coarse
    return fine.reshape(nq, width), ids.reshape(nq, width), coarse.reshape(nq, width), chunk_meta, block_meta


# ---------------------------------------------------------------------------------------------
# the result rows' labels (image_id, uri), looked up gallery-major too: each chunk's final top-k
# ids go to the blocks that hold them, whose tasks read the label row groups once per run
class Selected(NamedTuple):
    """A chunk's final choice (``nq x k`` scores, ids, coarse scores) and its figures so far."""
    chunk: int
    scores: np.ndarray
    ids: np.ndarray
    coarse: np.ndarray
    stats: dict


class LabelAsk(NamedTuple):
    """Result rows ``pos`` (positions in the chunk's result rows) of one chunk, whose gallery ids
    ``gid`` lie in one block."""
    chunk: int
    pos: np.ndarray
    gid: np.ndarray


class Labels(NamedTuple):
    """The labels of some result rows of a chunk (or, with ``meta``, a block's figures)."""
    pos: np.ndarray
    image_id: Any
    uri: Any
    meta: dict | None = None


def route_labels(chunk: int, gids: np.ndarray, block_of: BlockMap) -> Iterator[tuple[int, LabelAsk]]:
    """``(block, LabelAsk)`` for the blocks holding the chunk's result ids (``gids``, result row order)."""
    if not len(gids):
        return
    blk = block_of(gids)
    order = np.argsort(blk, kind="stable")
    bounds = np.flatnonzero(np.r_[True, blk[order][1:] != blk[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        pos = order[a:b]
        yield int(blk[pos[0]]), LabelAsk(chunk, pos.astype(np.int64), gids[pos])


def label_task(block: int, items: Iterable[Any], feature_files: Sequence[str],
               versions: Sequence[str | None] | None, cache: VectorCache, n_chunks: int
               ) -> Iterator[tuple[int, Any]]:
    """The labels of every result row asked of this block, read through ``cache`` (the block's label
    row groups once); :class:`Selected` records pass through to their chunk; the block's figures go
    to chunk ``block % n_chunks``."""
    t0 = time.monotonic()
    before = (cache.label_reads, cache.label_bytes)
    for it in items:
        if isinstance(it, Selected):
            yield it.chunk, it
            continue
        pos, image_id, uri = labels_by_file(it.gid, feature_files, versions, cache)
        yield it.chunk, Labels(it.pos[pos], image_id, uri)
    stats = {"block": block, "label_row_groups": cache.label_reads - before[0],
             "label_bytes_read": cache.label_bytes - before[1], "label_s": round(time.monotonic() - t0, 4)}
    yield block % max(1, n_chunks), Labels(np.zeros(0, np.int64), None, None, meta={"label_block": stats})


def assemble_labels(pieces: Sequence[Labels], n: int) -> tuple[Any, Any]:
    """``(image_id, uri)`` arrays of a chunk's ``n`` result rows from its label pieces."""
    pieces = [p for p in pieces if p.meta is None and len(p.pos)]
    if not pieces:
        if n:
            raise RuntimeError(f"labels of {n} result rows expected, none arrived")
        return pa.array([], pa.string()), pa.array([], pa.string())
    pos = np.concatenate([p.pos for p in pieces])
    if len(pos) != n or (n and not np.array_equal(np.sort(pos), np.arange(n))):
        raise RuntimeError(f"labels of {len(pos)} result rows arrived, expected each of {n} once")
    order = pa.array(np.argsort(pos, kind="stable"))
    return (pa.concat_arrays([p.image_id for p in pieces]).take(order),
            pa.concat_arrays([p.uri for p in pieces]).take(order))
