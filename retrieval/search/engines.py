"""The search's two engines over the task bodies of :mod:`retrieval.search.tasks`.

Spark: when every shard fits one task's shard cache, one task per chunk searches every shard and
merges (no shuffle); otherwise one task per (shard group x chunk), group-major so consecutive
tasks reuse the cached shards, their outputs shuffled by chunk (``partitionBy``) to one task per
chunk. Chunk-major, that task also reranks and writes; gallery-major, four more stages follow
(block scoring, chunk selection, block labels, chunk write), each after a ``partitionBy``. The
local engine runs the same functions in loops.
"""
from __future__ import annotations

import functools
import time
from typing import Iterable, Iterator

import numpy as np

from retrieval.engine import Engine
from retrieval.search import blocks as blocks_mod
from retrieval.search import coarse as coarse_mod
from retrieval.search.queries import Chunk
from retrieval.search.tasks import (SearchJob, block_task, chunk_task, coarse_task, label_task, merge_route,
                                    select_chunk, shard_groups, write_task)


def _local_shortlists(job: SearchJob) -> Iterator[tuple[Chunk, list, float, float, int]]:
    """Per chunk: ``(chunk, shard lists to merge, coarse s, merge s so far, shuffle bytes)``. One
    group of shards (all fit the shard cache): chunk by chunk (memory of one chunk). Several:
    group-major, each group loaded once and searched for every chunk, folded into running
    per-chunk shortlists (``queries x S`` in memory); the shuffle bytes are those the Spark
    plan moves (every group's lists)."""
    from retrieval.progress import Progress

    groups = shard_groups(job)
    if len(groups) == 1:
        for c in job.chunks:
            parts, secs = coarse_task(job, range(job.n_shards), c)
            yield c, [(s, i) for _, s, i in parts], secs, 0.0, 0
        return
    running: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    figures = {c.chunk: [0.0, 0.0, 0] for c in job.chunks}     # coarse s, merge s, shuffle bytes
    progress = Progress("search coarse", total=len(groups) * len(job.chunks), unit="tasks")
    for group in groups:
        for c in job.chunks:
            parts, secs = coarse_task(job, group, c)
            t = time.monotonic()
            prev = running.get(c.chunk)
            lists = ([prev] if prev is not None else []) + [(s, i) for _, s, i in parts]
            running[c.chunk] = coarse_mod.merge_shortlists(lists, job.shortlist, job.coarse_threshold)
            f = figures[c.chunk]
            f[0] += secs
            f[1] += time.monotonic() - t
            f[2] += sum(s.nbytes + i.nbytes for _, s, i in parts)
            progress.update(1)
    progress.finish()
    for c in job.chunks:
        f = figures[c.chunk]
        yield c, [running.pop(c.chunk)], f[0], f[1], f[2]


def run_local(job: SearchJob) -> list[dict]:
    """The Spark plan's task bodies in a loop. Chunk-major: each chunk merged, reranked, written
    in turn. Gallery-major: every chunk merged and routed, then each block scored (read once),
    then each chunk assembled and written (the routed pairs of all chunks in memory)."""
    from retrieval.progress import Progress

    progress = Progress("search", total=len(job.chunks), unit="chunks")
    stats: list[dict] = []
    by_block: dict[int, list[blocks_mod.Routed]] = {}
    for c, parts, coarse_s, merge_s, shuffled in _local_shortlists(job):
        if job.rerank == "chunk":
            st = chunk_task(job, c, parts, coarse_s, shuffled)
            st["merge_s"] = round(st["merge_s"] + merge_s, 4)
            stats.append(st)
        else:
            for b, r in merge_route(job, c, parts, coarse_s, shuffled, merge_s):
                by_block.setdefault(b, []).append(r)
        progress.update(1)
    progress.finish()
    if job.rerank == "chunk":
        return stats
    by_chunk = _local_stage(job, "search rerank", by_block, block_task)
    for c in job.chunks:
        for b, r in select_chunk(job, c, by_chunk.pop(c.chunk, [])):
            by_block.setdefault(b, []).append(r)
    by_chunk = _local_stage(job, "search labels", by_block, label_task)
    return [write_task(job, c, by_chunk.pop(c.chunk, [])) for c in job.chunks]


def _local_stage(job: SearchJob, label: str, by_block: dict[int, list], task) -> dict[int, list]:
    """One gallery-major stage in the local engine: ``task`` over every block's records (consumed),
    its output records gathered by chunk."""
    from retrieval.progress import Progress

    by_chunk: dict[int, list] = {}
    progress = Progress(label, total=len(job.blocks), unit="blocks")
    for b in range(len(job.blocks)):
        for c, rec in task(job, b, by_block.pop(b, [])):
            by_chunk.setdefault(c, []).append(rec)
        progress.update(1)
    progress.finish()
    return by_chunk


def _coarse_records(job: SearchJob, task: tuple[int, int]) -> list[tuple[int, tuple]]:
    group_no, chunk_no = task
    parts, secs = coarse_task(job, shard_groups(job)[group_no], job.chunks[chunk_no])
    return [(chunk_no, (shard_no, s, i, secs / len(parts))) for shard_no, s, i in parts]


def _chunk_lists(job: SearchJob, records: Iterable[tuple[int, tuple]]
                 ) -> Iterator[tuple[Chunk, list, float, int]]:
    """The shuffled shard lists of each chunk: ``(chunk, lists in shard order, coarse s, bytes)``."""
    by_chunk: dict[int, dict[int, tuple]] = {}
    for chunk_no, (shard_no, s, i, secs) in records:
        by_chunk.setdefault(chunk_no, {})[shard_no] = (s, i, secs)
    for chunk_no, shards in sorted(by_chunk.items()):
        if sorted(shards) != list(range(job.n_shards)):
            raise RuntimeError(f"chunk {chunk_no}: results of shards {sorted(shards)} arrived, "
                               f"expected all {job.n_shards}")
        parts = [(shards[n][0], shards[n][1]) for n in range(job.n_shards)]
        yield (job.chunks[chunk_no], parts, sum(v[2] for v in shards.values()),
               sum(s.nbytes + i.nbytes for s, i in parts))


def _chunk_partition(job: SearchJob, records: Iterable[tuple[int, tuple]]) -> Iterator[dict]:
    for chunk, parts, secs, shuffled in _chunk_lists(job, records):
        yield chunk_task(job, chunk, parts, secs, shuffled)


def _route_partition(job: SearchJob, records: Iterable[tuple[int, tuple]]) -> Iterator[tuple]:
    for chunk, parts, secs, shuffled in _chunk_lists(job, records):
        yield from merge_route(job, chunk, parts, secs, shuffled)


def _fused_task(job: SearchJob, chunk_no: int) -> dict:
    """One chunk end to end (every shard, merge, rerank, write): the plan when all shards fit
    in one task's shard cache, so no shortlist is shuffled."""
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return chunk_task(job, chunk, [(s, i) for _, s, i in parts], secs)


def _fused_route(job: SearchJob, chunk_no: int) -> list[tuple[int, blocks_mod.Routed]]:
    chunk = job.chunks[chunk_no]
    parts, secs = coarse_task(job, range(job.n_shards), chunk)
    return merge_route(job, chunk, [(s, i) for _, s, i in parts], secs)


def _block_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[tuple]:
    return block_task(job, index, (r for _, r in records))


def _select_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> list[tuple]:
    return select_chunk(job, job.chunks[index], (p for _, p in records))


def _label_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[tuple]:
    return label_task(job, index, (r for _, r in records))


def _write_partition(job: SearchJob, index: int, records: Iterable[tuple]) -> Iterator[dict]:
    yield write_task(job, job.chunks[index], (r for _, r in records))


def run_spark(engine: Engine, job: SearchJob, progress_seconds: float = 10.0) -> list[dict]:
    """Up to ``shard_cache`` shards: one task per chunk searches every shard and merges
    (:func:`_fused_task`). More: one coarse task per (shard group x chunk), group-major so
    consecutive tasks reuse the cached shards, their per-shard lists shuffled by chunk
    (``partitionBy``) to one merge task per chunk. Chunk-major: that task also reranks and writes.
    Gallery-major: it routes the pairs to one task per gallery block (shuffle), whose kept pairs
    go to one task per chunk (shuffle) that selects and writes."""
    sc = engine.spark.sparkContext
    n_chunks = len(job.chunks)
    groups = shard_groups(job)
    chunk_major = job.rerank == "chunk"
    if len(groups) == 1:
        base = sc.parallelize(range(n_chunks), n_chunks)
        rdd = base.map(functools.partial(_fused_task, job)) if chunk_major \
            else base.flatMap(functools.partial(_fused_route, job))
        total = n_chunks
    else:
        tasks = [(g, c) for g in range(len(groups)) for c in range(n_chunks)]   # group-major
        lists = sc.parallelize(tasks, len(tasks)).flatMap(functools.partial(_coarse_records, job)) \
            .partitionBy(n_chunks, lambda c: c)
        rdd = lists.mapPartitions(functools.partial(_chunk_partition if chunk_major else _route_partition, job))
        total = len(tasks) + n_chunks
    if not chunk_major:        # block scoring, selection, label lookups by block, writing by chunk
        for stage, n in ((_block_partition, len(job.blocks)), (_select_partition, n_chunks),
                         (_label_partition, len(job.blocks)), (_write_partition, n_chunks)):
            rdd = rdd.partitionBy(n, lambda key: key).mapPartitionsWithIndex(functools.partial(stage, job))
        total += 2 * (len(job.blocks) + n_chunks)
    return engine.run("search", total, rdd.collect, every=progress_seconds)
