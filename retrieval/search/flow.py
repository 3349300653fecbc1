"""The search's plan over the task bodies of :mod:`retrieval.search.tasks`: keyed steps
(:class:`retrieval.engine.Step`) that the engine runs (:meth:`retrieval.engine.Engine.run_steps`:
Spark tasks and ``partitionBy`` shuffles, or loops in this process over the same functions).

When every shard fits one task's shard cache, one task per chunk searches every shard and merges
(no shuffle); otherwise one task per (shard group x chunk), group-major so consecutive tasks reuse
the cached shards, their lists keyed by chunk to one task per chunk (the local engine folds a
chunk's lists as they arrive, :func:`_fold`: one shortlist per chunk in memory). Chunk-major, that
task also reranks and writes; gallery-major, four more steps follow (block scoring, chunk
selection, block labels, chunk write), each after a shuffle by key.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from retrieval.engine import Engine, Step
from retrieval.search import blocks as blocks_mod
from retrieval.search import coarse as coarse_mod
from retrieval.search import listtasks
from retrieval.search.queries import Chunk
from retrieval.search.tasks import (SearchJob, block_task, chunk_task, coarse_task, label_task, merge_route,
                                    select_chunk, shard_groups, write_task)


@dataclass(frozen=True)
class Lists:
    """Shard lists of one chunk, the record from a coarse task to its chunk's merge: the lists of
    ``shards`` (one per shard, or one already merged), the coarse seconds, the bytes of the shard
    lists (what the plan shuffles) and the merge seconds spent folding them so far."""
    shards: tuple[int, ...]
    lists: tuple[tuple[np.ndarray, np.ndarray], ...]
    coarse_s: float
    nbytes: int
    merge_s: float = 0.0


def _coarse_records(job: SearchJob, task: tuple[int, int]) -> list[tuple[int, Lists]]:
    group_no, chunk_no = task
    parts, secs = coarse_task(job, shard_groups(job)[group_no], job.chunks[chunk_no])
    return [(chunk_no, Lists(tuple(p[0] for p in parts), tuple(p[1:] for p in parts), secs,
                             sum(a.nbytes for p in parts for a in p[1:])))]


def _fold(job: SearchJob, a: Lists, b: Lists) -> Lists:
    """Two records of a chunk merged into one shortlist (the merge task merges it again: the same set)."""
    t = time.monotonic()
    merged = coarse_mod.merge_shortlists([*a.lists, *b.lists], job.shortlist, job.coarse_threshold)
    return Lists(a.shards + b.shards, (merged,), a.coarse_s + b.coarse_s, a.nbytes + b.nbytes,
                 a.merge_s + b.merge_s + time.monotonic() - t)


def _chunk_lists(job: SearchJob, chunk_no: int, records: Iterable[Lists]
                 ) -> tuple[Chunk, list, float, int, float]:
    """A chunk's records checked (every shard once) and joined: ``(chunk, lists in shard order,
    coarse s, shuffle bytes, merge s so far)``."""
    got = sorted({r.shards: r for r in records}.values(), key=lambda r: min(r.shards))
    shards = sorted(n for r in got for n in r.shards)
    if shards != list(range(job.n_shards)):
        raise RuntimeError(f"chunk {chunk_no}: results of shards {shards} arrived, expected all {job.n_shards}")
    return (job.chunks[chunk_no], [p for r in got for p in r.lists], sum(r.coarse_s for r in got),
            sum(r.nbytes for r in got), sum(r.merge_s for r in got))


def _chunk_step(job: SearchJob, chunk_no: int, records: Iterable[Lists]) -> list[dict]:
    chunk, parts, secs, shuffled, merge_s = _chunk_lists(job, chunk_no, records)
    st = chunk_task(job, chunk, parts, secs, shuffled)
    st["merge_s"] = round(st["merge_s"] + merge_s, 4)
    return [st]


def _route_step(job: SearchJob, chunk_no: int, records: Iterable[Lists]) -> list[tuple[int, blocks_mod.Routed]]:
    chunk, parts, secs, shuffled, merge_s = _chunk_lists(job, chunk_no, records)
    return _merge_route(job)(job, chunk, parts, secs, shuffled, merge_s)


def _merge_route(job: SearchJob):
    """The merge + route of the gallery-major rerank: by IVF-list block over the index's list-ordered
    fine copy (:mod:`retrieval.search.listblocks`), or by feature-file block."""
    return listtasks.merge_route if job.list_blocks else merge_route


def _fused_task(job: SearchJob, chunk_no: int) -> list[dict]:
    """One chunk end to end (every shard, merge, rerank, write): the plan when all shards fit
    in one task's shard cache, so no shortlist is shuffled."""
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return [chunk_task(job, chunk, [p[1:] for p in parts], secs)]


def _fused_route(job: SearchJob, chunk_no: int) -> list[tuple[int, blocks_mod.Routed]]:
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return _merge_route(job)(job, chunk, [p[1:] for p in parts], secs)


def _select_step(job: SearchJob, chunk_no: int, records: Iterable) -> list[tuple]:
    return select_chunk(job, job.chunks[chunk_no], records)


def _write_step(job: SearchJob, chunk_no: int, records: Iterable) -> list[dict]:
    return [write_task(job, job.chunks[chunk_no], records)]


def steps(job: SearchJob) -> tuple[list, list[Step]]:
    """The plan's items and steps. Up to ``shard_cache`` shards: one task per chunk searches every
    shard and merges (:func:`_fused_task`). More: one coarse task per (shard group x chunk),
    group-major so consecutive tasks reuse the cached shards, their lists keyed by chunk to one
    merge task per chunk. Chunk-major: that task also reranks and writes. Gallery-major: it routes
    the pairs to one task per gallery block, whose kept pairs go to one task per chunk that
    selects, the result ids to their blocks for labels, and those to one task per chunk that writes."""
    n_chunks = len(job.chunks)
    groups = shard_groups(job)
    chunk_major = job.rerank == "chunk"
    if len(groups) == 1:
        items: list = list(range(n_chunks))
        plan = [Step(functools.partial(_fused_task if chunk_major else _fused_route, job),
                     progress="search", unit="chunks")]
    else:
        items = [(g, c) for g in range(len(groups)) for c in range(n_chunks)]   # group-major
        plan = [Step(functools.partial(_coarse_records, job), progress="search coarse", unit="tasks"),
                Step(functools.partial(_chunk_step if chunk_major else _route_step, job), n_chunks,
                     progress="search", unit="chunks", combine=functools.partial(_fold, job))]
    if not chunk_major:        # block scoring, selection, label lookups by block, writing by chunk
        scoring = listtasks.block_task if job.list_blocks else block_task
        plan += [Step(functools.partial(scoring, job), job.scoring_blocks, progress="search rerank", unit="blocks"),
                 Step(functools.partial(_select_step, job), n_chunks),
                 Step(functools.partial(label_task, job), len(job.blocks), progress="search labels", unit="blocks"),
                 Step(functools.partial(_write_step, job), n_chunks)]
    return items, plan


def run(engine: Engine, job: SearchJob, progress_seconds: float = 10.0) -> list[dict]:
    """Every chunk's stats (in no particular order): the plan (:func:`steps`) on ``engine``."""
    items, plan = steps(job)
    return engine.run_steps("search", items, plan, every=progress_seconds)
