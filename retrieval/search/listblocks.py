"""Gallery-major rerank over the list-ordered copy of the fine column (``index.fine_by_list``).

The blocks of :mod:`retrieval.search.blocks` are runs of feature-file row groups, in extraction
order: a query's shortlist touches nearly all of them, so each block task reads nearly every query
vector (blocks x queries x 516 B). Here a block is a **range of IVF lists** of the index's
list-ordered copy (:mod:`retrieval.index.finecopy`, one file per shard): a candidate lies in one of
its query's ``nprobe`` probed lists, so a query's pairs fall in at most ``nprobe`` blocks (fewer:
sibling cells have neighbouring numbers). The coarse tasks carry each candidate's list through the
merge (:func:`~retrieval.search.coarse.merge_shortlists` with three-part lists); :func:`route`
splits a chunk's pairs by the block of their list and sends with them the fine vectors of just the
queries that have pairs there (read once per chunk by the merge task, as stored); the block task
reads its row groups of every shard's copy once, finds each candidate's row by id and scores the
pairs with the rerank's kernel on the same float32 query vectors and the same int8 codes and scales:
the kept pairs, the selection and the result rows are the ones the feature-file blocks give.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from retrieval import fsio
from retrieval.schema import column_matrix, fine_matrix
from retrieval.search import blocks as blocks_mod
from retrieval.search import rerank as rerank_mod
from retrieval.search.coarse import _ivf, lru_cached
from retrieval.search.vectors import _decoded_row_bytes


@dataclass(frozen=True)
class ListBlock:
    """Lists ``[lo, hi)``; ``groups``: per shard, ``(shard, g0, g1)``: row groups ``[g0, g1)`` of its
    copy hold those lists (contiguous: the copy is in list order)."""
    block: int
    lo: int
    hi: int
    groups: tuple[tuple[int, int, int], ...]
    decoded_bytes: int


def _fine_bytes(md, groups: Iterable[int]) -> int:
    """The stored bytes of the ``fine`` / ``fine_scale`` columns in row groups ``groups`` of a copy."""
    fine = [j for j in range(md.num_columns) if md.schema.column(j).path.split(".")[0] in ("fine", "fine_scale")]
    return sum(md.row_group(g).column(j).total_compressed_size for g in groups for j in fine)


def _footer(url: str) -> tuple[np.ndarray, int, dict | None]:
    """``[(min list, max list, rows, stored fine bytes)]`` per row group of a copy, its row bytes and
    its key-value metadata (the rows of each list)."""
    pf = fsio.parquet_file(url)
    md = pf.metadata
    li = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)].index("list")
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        st = rg.column(li).statistics
        out.append((st.min, st.max, rg.num_rows, _fine_bytes(md, (g,))))
    schema = pf.schema_arrow
    row_bytes = _decoded_row_bytes(schema.field("fine").type, "fine_scale" in schema.names)
    return np.array(out, np.int64).reshape(-1, 4), int(row_bytes), md.metadata


def plan(copies: Sequence[str], nlist: int, budget_bytes: int) -> tuple[list[ListBlock], dict]:
    """Blocks of consecutive lists of at most ``budget_bytes`` decoded (one list at least), from the
    copies' footers (the rows of each list their metadata records; else each row group's rows counted
    at its first list); and the copies' size."""
    from retrieval.index.finecopy import list_sizes

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(16, max(1, len(copies)))) as pool:
        footers = list(pool.map(_footer, copies))
    row_bytes = max([rb for _, rb, _ in footers], default=516)
    per_list = np.zeros(nlist + 1, np.int64)
    for groups, _, meta in footers:
        sizes = list_sizes(meta, nlist)
        if sizes is not None:
            per_list[:nlist] += sizes
        else:
            np.add.at(per_list, groups[:, 0], groups[:, 2])
    budget_rows = max(1, budget_bytes // max(row_bytes, 1))
    cuts, held = [0], 0
    for lst, n in enumerate(per_list[:nlist].tolist()):
        if held and held + n > budget_rows:
            cuts.append(lst)
            held = 0
        held += n
    cuts.append(nlist)
    blocks = []
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        hit = [(s, np.flatnonzero((g[:, 1] >= lo) & (g[:, 0] < hi))) for s, (g, _, _) in enumerate(footers) if len(g)]
        groups = tuple((s, int(h[0]), int(h[-1]) + 1) for s, h in hit if len(h))
        rows = int(sum(footers[s][0][g0:g1, 2].sum() for s, g0, g1 in groups))
        blocks.append(ListBlock(b, int(lo), int(hi), groups, rows * row_bytes))
    size = {"stored": int(sum(g[:, 3].sum() for g, _, _ in footers)),
            "decoded": int(sum(g[:, 2].sum() for g, _, _ in footers)) * row_bytes}
    return blocks, size


def block_of_lists(blocks: Sequence[ListBlock]):
    """list number -> block number."""
    lows = np.array([b.lo for b in blocks], np.int64)
    return lambda lists: np.searchsorted(lows, lists, side="right") - 1


def route(chunk: int, ids: np.ndarray, coarse: np.ndarray, lists: np.ndarray, queries: pa.Table,
          blocks: Sequence[ListBlock], meta: dict) -> Iterator[tuple[int, blocks_mod.Routed]]:
    """``(block, Routed)`` for every block holding candidates of the chunk's merged shortlist, each
    with the stored fine vectors (``queries``: the chunk's ``fine``/``fine_scale`` rows) of the
    queries that have pairs there; the chunk's ``meta`` to one block."""
    width = ids.shape[1] if ids.ndim == 2 else 1
    flat_ids, flat_lists = ids.ravel(), lists.ravel()
    pos = np.flatnonzero(flat_ids >= 0)
    blk = block_of_lists(blocks)(flat_lists[pos].astype(np.int64)) if len(pos) else np.zeros(0, np.int64)
    order = np.lexsort((flat_ids[pos], blk))
    pos, blk = pos[order], blk[order]
    flat_coarse = coarse.ravel()
    bounds = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1], True]) if len(blk) else np.zeros(1, np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        p = pos[a:b]
        qrows = np.unique(p // width)
        yield int(blk[a]), blocks_mod.Routed(chunk, p.astype(np.int32), flat_ids[p],
                                             flat_coarse[p].astype(np.float32), None, qrows.astype(np.int32),
                                             queries.take(pa.array(qrows)))
    yield chunk % max(1, len(blocks)), blocks_mod.Routed(chunk, *blocks_mod._empty(blocks_mod.Routed), meta=meta)


def read_block(block: ListBlock, copies: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """The block's rows of every shard's copy: ``(ids, codes, scales)`` row for row, shard after
    shard (each shard's rows in (list, id) order), and the read's figures. A copy's rows are sorted
    by list, so the block's lists are one slice of its row groups (no filter copy); the codes are
    copied once, chunk by chunk, into one array."""
    tables = []
    stats = {"row_groups": 0, "bytes_read": 0, "bytes_decoded": 0}
    for shard, g0, g1 in block.groups:
        groups = list(range(g0, g1))
        pf = fsio.parquet_file(copies[shard])
        cols = [c for c in ("list", "id", "fine", "fine_scale") if c in pf.schema_arrow.names]
        t = pf.read_row_groups(groups, columns=cols)
        lo, hi = np.searchsorted(t.column("list").to_numpy(), [block.lo, block.hi])
        tables.append(t.slice(int(lo), int(hi - lo)))
        stats["row_groups"] += len(groups)
        stats["bytes_read"] += _fine_bytes(pf.metadata, groups)
    if not tables:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int8), None, stats
    ids = np.concatenate([t.column("id").to_numpy() for t in tables])
    chunks = [column_matrix(c) for t in tables for c in t.column("fine").chunks if len(c)]
    if chunks:
        codes = np.concatenate(chunks)
    else:
        ft = tables[0].schema.field("fine").type
        codes = (np.zeros((0, ft.byte_width), np.int8) if pa.types.is_fixed_size_binary(ft)
                 else np.zeros((0, ft.list_size), np.float32))
    s = (np.concatenate([t.column("fine_scale").to_numpy() for t in tables]).astype(np.float32)
         if "fine_scale" in tables[0].column_names else None)
    stats["bytes_decoded"] = int(codes.nbytes + (s.nbytes if s is not None else 0))
    return ids, codes, s, stats


def block_task(block: ListBlock, items: Iterable[blocks_mod.Routed], copies: Sequence[str], width: int, k: int,
               threads: int, n_chunks: int = 1) -> Iterator[tuple[int, blocks_mod.Piece]]:
    """Score every pair routed to ``block`` (its rows read once; the query vectors came with the
    pairs), keep each query's ``k`` best per chunk: ``(chunk, Piece)`` records; chunk metas pass
    through; the block's figures go to chunk ``block % n_chunks``."""
    Piece = blocks_mod.Piece
    t0 = time.monotonic()
    items = list(items)
    pairs = [it for it in items if it.meta is None]
    ids, codes, scales, stats = read_block(block, copies)
    order = np.argsort(ids, kind="stable")          # candidate id -> its row in ``codes``
    ids = ids[order]
    t_read = time.monotonic() - t0
    score_s, out_bytes, kept, n_pairs, q_bytes = 0.0, 0, 0, 0, 0
    for it in pairs:
        t = time.monotonic()
        row = np.clip(np.searchsorted(ids, it.gid), 0, max(len(ids) - 1, 0))
        if not len(ids) or (ids[row] != it.gid).any():
            raise KeyError(f"list block {block.block} (lists {block.lo}-{block.hi - 1}): a shortlist id is not in "
                           "the index's list-ordered fine copy (the copy does not match the shards)")
        row = order[row]
        q = fine_matrix(it.queries)
        q_bytes += sum(it.queries.column(c).nbytes for c in it.queries.column_names)
        local = np.searchsorted(it.qrows, it.pos // width).astype(np.int64) * width + it.pos % width
        scratch = np.empty(len(it.qrows) * width, np.float32)
        rerank_mod.score_pairs_into(scratch, q, local, width, codes, row, scales, threads)
        fine = scratch[local]
        keep = blocks_mod.keep_topk(it.pos, it.gid, fine, width, k)
        piece = Piece(block.block, it.pos[keep], it.gid[keep], fine[keep], it.coarse[keep])
        out_bytes += piece.nbytes
        kept += len(keep)
        n_pairs += len(it.pos)
        score_s += time.monotonic() - t
        yield it.chunk, piece
    for it in items:
        if it.meta is not None:
            yield it.chunk, Piece(-1, *blocks_mod._empty(Piece), meta={"chunk": it.meta})
    stats.update({"block": block.block, "lists": [block.lo, block.hi], "pairs": n_pairs, "pairs_kept": kept,
                  "shuffle_bytes": out_bytes, "query_bytes_read": 0, "query_bytes_shuffled": q_bytes,
                  "read_s": round(t_read, 4), "score_s": round(score_s, 4)})
    yield block.block % max(1, n_chunks), Piece(-1, *blocks_mod._empty(Piece), meta={"block": stats})


_TABLES: "OrderedDict[tuple, object]" = OrderedDict()


def shard_lists(index_url: str, shard_no: int, manifest: dict, index, ids: np.ndarray, capacity: int) -> np.ndarray:
    """The IVF list of each of a shard's candidate ``ids`` (-1 for -1), from the shard's id -> list
    table, made from its inverted lists once per process while its shard stays cached."""
    from retrieval.index import finecopy

    key = (index_url, shard_no, manifest["shards"][shard_no].get("sha256"))
    lookup = lru_cached(_TABLES, key, lambda: finecopy.ListLookup(finecopy.list_table(_ivf(index)[0])),
                        lambda c: len(c) > max(1, capacity), "list table")
    return lookup(ids)
