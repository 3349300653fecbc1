"""The task bodies of the gallery-major rerank over the list-ordered fine copy
(:mod:`retrieval.search.listblocks`): merge + route (the chunk's query vectors read once and sent
only to the blocks its shortlist touches) and block scoring. Selection, labels and writing are the
feature-file plan's (:mod:`retrieval.search.tasks`)."""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from retrieval import faults
from retrieval.engine import task_threads
from retrieval.search import blocks as blocks_mod
from retrieval.search import coarse as coarse_mod
from retrieval.search import listblocks
from retrieval.search.queries import Chunk
from retrieval.search.tasks import SearchJob, _configure_process, _fine_bytes, query_rows


def merge_route(job: SearchJob, chunk: Chunk, parts: Sequence[tuple[np.ndarray, ...]],
                coarse_s: float = 0.0, shuffle_bytes: int = 0, merge_s: float = 0.0
                ) -> list[tuple[int, blocks_mod.Routed]]:
    """Merge the shards' lists (with each candidate's IVF list) of one chunk into its global top S,
    then split its pairs by list block, each block's with the vectors of its queries."""
    _configure_process(job)
    faults.maybe_fail(job.faults, "search", chunk.chunk, 0)
    t0 = time.monotonic()
    c_scores, c_ids, c_lists = coarse_mod.merge_shortlists(parts, job.shortlist, job.coarse_threshold)
    q = query_rows(job, chunk, ["fine"] + (["fine_scale"] if job.query_int8 else []))
    meta = {"coarse_s": round(coarse_s, 4), "merge_s": 0.0,
            "queries_with_shortlist": int((c_ids >= 0).any(axis=1).sum()) if c_ids.size else 0,
            "query_fine_bytes_read": _fine_bytes(q)}
    records = list(listblocks.route(chunk.chunk, c_ids, c_scores, c_lists, q, job.list_blocks, meta))
    meta["merge_s"] = round(merge_s + time.monotonic() - t0, 4)
    meta["shuffle_bytes"] = shuffle_bytes + sum(r.pos.nbytes + r.gid.nbytes + r.coarse.nbytes for _, r in records)
    meta["query_shuffle_bytes"] = sum(r.queries.nbytes for _, r in records if r.queries is not None)
    return records


def block_task(job: SearchJob, block_no: int, items: Iterable[blocks_mod.Routed]
               ) -> Iterator[tuple[int, blocks_mod.Piece]]:
    """Score the pairs routed to one list block (its rows of every shard's copy read once)."""
    _configure_process(job)
    return listblocks.block_task(job.list_blocks[block_no], items, job.fine_copies, job.shortlist, job.k,
                                 task_threads(job.threads), len(job.chunks))
