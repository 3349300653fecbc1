"""The local engine: every task function in this process, in order (no JVM)."""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

from retrieval import progress as progress_mod
from retrieval.engine.base import Engine, Step, key_slices


class LocalEngine(Engine):
    """The task functions in this process, in order (``threads > 1``: a thread pool, for I/O-bound
    tasks such as hashing files). No JVM."""

    name = "local"

    @property
    def parallelism(self) -> int:
        return max(1, os.cpu_count() or 1)

    def progress(self, label, total, unit, every=10.0):
        return progress_mod.stage(label, total, unit, every)

    def map(self, fn, items, label, every=10.0, threads=1):
        with progress_mod.stage(label, len(items), "tasks", every, brief=True) as p:
            fn = _counted(fn, p)
            if threads > 1 and len(items) > 1:
                with ThreadPoolExecutor(min(threads, len(items))) as pool:
                    return list(pool.map(fn, items))
            return [fn(x) for x in items]

    def map_reduce(self, fn, items, merge, label, every=10.0):
        with progress_mod.stage(label, len(items), "tasks", every, brief=True) as p:
            return functools.reduce(merge, (_counted(fn, p)(x) for x in items))

    def map_batches(self, fn, items, parts, label, every=10.0):
        with progress_mod.stage(label, len(items), "items", every, brief=True) as p:
            def counted(seq: Iterable) -> Iterator:
                for x in seq:
                    yield x
                    p.update(1)
            return list(fn(counted(iter(items))))

    def run_steps(self, label: str, items: Sequence, steps: Sequence[Step], every: float = 10.0) -> list:
        """Step by step in loops: the first over the items, each next over its keys in order, a
        key's values gathered (or folded with the step's ``combine``) as the step before yields them."""
        inbox: dict[Any, list] = {}
        results: list = []
        for n, step in enumerate(steps):
            nxt = steps[n + 1] if n + 1 < len(steps) else None
            outbox: dict[Any, list] = {}
            total = len(items) if n == 0 else step.parts
            for out in _progressed(step, total, _tasks(step, n, items, inbox), every):
                if nxt is None:
                    results.extend(out)
                    continue
                for key, value in out:
                    got = outbox.get(key)
                    if got is None:
                        outbox[key] = [value]
                    elif nxt.combine is not None:
                        got[0] = nxt.combine(got[0], value)
                    else:
                        got.append(value)
            inbox = outbox
        return results

    def map_arrow(self, fn, table, key, schema, label, every=10.0):
        import pyarrow as pa

        out = [b for part in key_slices(table, key) for b in fn(iter(part.to_batches()))]
        return pa.Table.from_batches(out, schema=schema)

    def find_duplicates(self, fn, items, key, schema, label, rows=0, every=10.0):
        import pyarrow as pa
        import pyarrow.compute as pc

        if not items:
            return schema.empty_table()
        table = pa.concat_tables([fn(x) for x in items])
        counts = table.group_by(key).aggregate([(key, "count")])
        dup = counts.filter(pc.greater(counts.column(f"{key}_count"), 1)).column(key)
        return table.filter(pc.is_in(table.column(key), value_set=dup.combine_chunks()))

    def connected_components(self, fn, items, schema, label, every=10.0):
        """``scipy.sparse.csgraph.connected_components`` over the nodes' ranks in sorted order."""
        import pyarrow as pa

        tables = [fn(x).select(["src", "dst"]).cast(schema) for x in items]
        if not tables or not sum(t.num_rows for t in tables):
            return pa.table({"node": pa.array([], schema.field("src").type),
                             "component": pa.array([], schema.field("src").type)})
        return components_of(pa.concat_tables(tables).combine_chunks())

    def map_matched(self, fn, items, keys, lookup, tables, schema, label, every=10.0):
        import pyarrow as pa
        import pyarrow.compute as pc

        if not items or not tables:
            return {}
        table = pa.concat_tables([lookup(t).select(schema.names).cast(schema) for t in tables])
        key = table.column(0)
        out = {}
        with progress_mod.stage(label, len(items), "tasks", every, brief=True) as p:
            for i, item in enumerate(items):
                wanted = pc.unique(keys(item).column(0).combine_chunks()).cast(key.type)
                rows = table.filter(pc.is_in(key, value_set=wanted))
                if rows.num_rows:
                    out[i] = fn(item, rows)
                p.update(1)
        return out

    def run_torch(self, fn, processes, arg, local_mode=True, use_gpu=False):
        if processes > 1:
            raise ValueError(f"train.processes={processes} runs through Spark's TorchDistributor: use --engine "
                             "spark (or train.processes=1 with --engine local)")
        return fn(arg)


def components_of(edges: Any) -> Any:
    """``(node, component)`` of an Arrow edge table ``(src, dst)`` (scipy; component = smallest node)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ends = pa.concat_arrays([edges.column("src").combine_chunks(), edges.column("dst").combine_chunks()])
    nodes = pc.unique(ends)
    nodes = nodes.take(pc.sort_indices(nodes))                  # rank order = value order
    src = pc.index_in(edges.column("src"), value_set=nodes).to_numpy(zero_copy_only=False)
    dst = pc.index_in(edges.column("dst"), value_set=nodes).to_numpy(zero_copy_only=False)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(smallest, labels, np.arange(n))               # each component's smallest rank
    return pa.table({"node": nodes, "component": nodes.take(pa.array(smallest[labels]))})


def _tasks(step: Step, n: int, items: Sequence, inbox: dict[Any, list]) -> Iterator[Iterable]:
    """The outputs of a step's tasks, one task at a time (a key's values released once it ran)."""
    if n == 0:
        for x in items:
            yield step.fn(x)
        return
    for key in range(step.parts):
        yield step.fn(key, iter(inbox.pop(key, [])))


def _progressed(step: Step, total: int, outputs: Iterator[Iterable], every: float) -> Iterator[list]:
    """Each task's output, materialised, with the step's progress line (if any) per task."""
    from retrieval.progress import Progress

    progress = Progress(step.progress, total=total, every=every, unit=step.unit) if step.progress else None
    for out in outputs:
        out = list(out)
        if progress is not None:
            progress.update(1)
        yield out
    if progress is not None:
        progress.finish()


def _counted(fn: Any, p: Any) -> Any:
    def run(x: Any) -> Any:
        out = fn(x)
        p.update(1)
        return out
    return run


LOCAL = LocalEngine()
