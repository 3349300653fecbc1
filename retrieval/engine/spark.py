"""The Spark engine: one Spark task per work unit of a SparkSession, under the driver's progress
lines (:class:`retrieval.engine.session.ProgressMonitor`) and the task errors' translation. Every
Spark plan of the project is here: RDD maps, the keyed steps' ``partitionBy`` shuffles
(:meth:`SparkEngine.run_steps`), Arrow IPC partitions (:meth:`SparkEngine.map_arrow`), the window that
finds duplicate keys (:meth:`SparkEngine.find_duplicates`). pyspark is imported when used."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

from retrieval.engine.base import Engine, Shared, Step, key_slices, translate

log = logging.getLogger(__name__)


class SparkEngine(Engine):
    """Spark tasks of ``spark`` (a SparkSession), one per work unit, with the driver's progress lines
    (tasks done, rate, ETA) every ``every`` seconds."""

    name = "spark"
    is_spark = True

    def __init__(self, spark: Any) -> None:
        self.spark = spark

    @property
    def parallelism(self) -> int:
        return int(self.spark.sparkContext.defaultParallelism)

    @property
    def tasks_on_this_machine(self) -> bool:
        return str(self.spark.sparkContext.master).startswith("local")

    @property
    def session(self) -> str | None:
        return str(self.spark.sparkContext.applicationId)

    def run(self, label, total, action, every=10.0):
        from retrieval.engine.session import ProgressMonitor

        try:
            with ProgressMonitor(self.spark, label, total_tasks=total, every=every):
                return action()
        except Exception as exc:
            clear = translate(exc)
            if clear is not None:
                raise clear from None
            raise

    def _rdd(self, items: Sequence, parts: int):
        return self.spark.sparkContext.parallelize(list(items), max(1, parts))

    def map(self, fn, items, label, every=10.0, threads=1):
        if not items:
            return []
        rdd = self._rdd(items, len(items)).map(fn)
        return self.run(label, len(items), rdd.collect, every)

    def map_reduce(self, fn, items, merge, label, every=10.0):
        rdd = self._rdd(items, len(items)).map(fn)
        return self.run(label, len(items), lambda: rdd.treeReduce(merge, depth=2), every)

    def map_batches(self, fn, items, parts, label, every=10.0):
        rdd = self._rdd(items, parts).mapPartitions(fn)
        return self.run(label, parts, rdd.collect, every)

    def run_steps(self, label: str, items: Sequence, steps: Sequence[Step], every: float = 10.0) -> list:
        """One job: a task per item (``flatMap``), then per step ``partitionBy(parts)`` on the
        records' keys and a task per partition (``mapPartitionsWithIndex``); ``combine`` is not
        used (the records are shuffled as they are)."""
        rdd = self._rdd(items, len(items)).flatMap(steps[0].fn)
        for step in steps[1:]:
            rdd = rdd.partitionBy(step.parts, _identity).mapPartitionsWithIndex(
                functools.partial(_values_to, step.fn))
        return self.run(label, len(items) + sum(s.parts for s in steps[1:]), rdd.collect, every)

    def map_arrow(self, fn, table, key, schema, label, every=10.0):
        """One partition per value of ``key`` (in sorted order) holding that value's rows as one
        zstd-compressed Arrow IPC stream, ``mapPartitions`` running ``fn`` on its record batches: one
        stage, no shuffle, no row conversion (a warm job of two tasks: 0.13 s against 0.38 s through
        ``partitionBy`` + ``createDataFrame`` + ``mapInArrow``); the output batches come back as IPC too."""
        import pyarrow as pa

        blobs = [_ipc(part) for part in key_slices(table, key)]
        if not blobs:
            return schema.empty_table()
        rdd = self.spark.sparkContext.parallelize(blobs, len(blobs)).mapPartitions(
            functools.partial(_arrow_partition, fn))
        out = self.run(label, len(blobs), rdd.collect, every)
        batches = [b for blob in out for b in pa.ipc.open_stream(blob)]
        return pa.Table.from_batches(batches, schema=schema)

    def find_duplicates(self, fn, items, key, schema, label, rows=0, every=10.0):
        """The items read by tasks (``mapInArrow``), one shuffle by ``key`` (into ~2M rows a
        partition), a window count over it: only the rows of repeated keys reach the driver."""
        from pyspark.sql.pandas.types import from_arrow_schema

        if not items:
            return schema.empty_table()
        shared = self.broadcast(list(items))       # the items travel as a broadcast, the rows as their index
        frame = self.spark.createDataFrame([(i,) for i in range(len(items))], "item long")
        n = max(1, min(len(items), self.parallelism * 4))
        tables = frame.repartition(n).mapInArrow(functools.partial(_tables_of, fn, shared), from_arrow_schema(schema))
        parts = max(self.parallelism, -(-int(rows) // 2_000_000))
        cols = [f"`{c}`" for c in schema.names]
        try:
            occ = self.run(label, n + parts, lambda: (
                tables.repartition(parts, key)
                .selectExpr(*cols, f"count(1) OVER (PARTITION BY `{key}`) AS `__count`")
                .filter("`__count` > 1").select(*schema.names).toArrow()))
        finally:
            shared.destroy()
        return occ.select(schema.names).cast(schema)

    def connected_components(self, fn, items, schema, label, every=10.0):
        """Large-star / small-star (Kiveris et al. 2014, "Connected Components in MapReduce and
        Beyond") in DataFrame operations: rounds of the two steps until a round changes no edge
        (O(log^2 n) rounds, chains included), each round's edges checkpointed; then every node
        points at its component's smallest node. Only the ``(node, component)`` rows come back."""
        import pyarrow as pa
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        typ = schema.field("src").type
        if not items:
            return pa.table({"node": pa.array([], typ), "component": pa.array([], typ)})
        shared = self.broadcast(list(items))
        try:
            frame = self.spark.createDataFrame([(i,) for i in range(len(items))], "item long")
            n = max(1, min(len(items), self.parallelism * 4))
            edges = frame.repartition(n).mapInArrow(functools.partial(_tables_of, fn, shared),
                                                    from_arrow_schema(schema)).select("src", "dst")
            edges = self.run(label, n, lambda: edges.localCheckpoint(eager=True), every)
            nodes = edges.select(F.col("src").alias("node")).union(edges.select(F.col("dst").alias("node"))) \
                .distinct()
            stars = self.run(label, n, lambda: _stars(edges.filter("src != dst")), every)
            out = nodes.join(stars, "node", "left") \
                .select("node", F.coalesce("component", "node").alias("component"))
            got = self.run(label, n, out.toArrow, every)
        finally:
            shared.destroy()
        return got.select(["node", "component"]).cast(pa.schema([("node", typ), ("component", typ)]))

    def graph_groups(self, fn, items, schema, write, label, largest, every=10.0):
        """The pairs read in tasks, their components by large-star / small-star, the groups made and
        written by Spark (:func:`retrieval.engine.graph.groups_of`): nothing row-sized collected."""
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        from retrieval.engine.graph import groups_of

        if not items:
            return None
        shared = self.broadcast(list(items))
        try:
            frame = self.spark.createDataFrame([(i,) for i in range(len(items))], "item long")
            n = max(1, min(len(items), self.parallelism * 4))
            pairs = frame.repartition(n).mapInArrow(functools.partial(_tables_of, fn, shared),
                                                    from_arrow_schema(schema))
            pairs = self.run(label, n, lambda: pairs.localCheckpoint(eager=True), every)
            edges = pairs.select(F.col("query_id").alias("src"), F.col("gallery_id").alias("dst"))
            nodes = edges.select(F.col("src").alias("node")).union(edges.select(F.col("dst").alias("node"))) \
                .distinct()
            stars = self.run(label, n, lambda: _stars(edges.filter("src != dst")), every)
            comp = nodes.join(stars, "node", "left").select("node", F.coalesce("component", "node").alias("component"))
            return self.run(label, n, lambda: groups_of(pairs, comp, write, largest), every)
        finally:
            shared.destroy()

    def map_matched(self, fn, items, keys, lookup, tables, schema, label, every=10.0):
        """The items' keys and the lookup read in tasks (``mapInArrow``), joined, then one
        ``applyInArrow`` task per item with matches: only ``fn``'s results (JSON) reach the driver."""
        import json

        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        if not items or not tables:
            return {}
        key = schema.names[0]
        key_type = from_arrow_schema(schema)[key].dataType.simpleString()
        shared, shared_tables = self.broadcast(list(items)), self.broadcast(list(tables))
        try:
            n, m = (max(1, min(len(x), self.parallelism * 4)) for x in (items, tables))
            left = self.spark.createDataFrame([(i,) for i in range(len(items))], "item long").repartition(n) \
                .mapInArrow(functools.partial(_keys_of, keys, shared, key), f"item long, `{key}` {key_type}")
            right = self.spark.createDataFrame([(i,) for i in range(len(tables))], "item long").repartition(m) \
                .mapInArrow(functools.partial(_tables_of, lookup, shared_tables), from_arrow_schema(schema))
            joined = left.distinct().join(right, key).select("item", *[F.col(f"`{c}`") for c in schema.names])
            # a plain function (pyspark infers applyInArrow's kind from type hints; a partial has none)
            out = joined.groupBy("item").applyInArrow(lambda t: _matched_task(fn, shared, schema, t),
                                                      "item long, result binary")
            rows = self.run(label, n + m, out.collect, every)
        finally:
            shared.destroy()
            shared_tables.destroy()
        return {int(r["item"]): json.loads(r["result"]) for r in rows}

    def broadcast(self, value):
        return Shared(None, self.spark.sparkContext.broadcast(value))

    def run_torch(self, fn, processes, arg, local_mode=True, use_gpu=False):
        from pyspark.ml.torch.distributor import TorchDistributor

        distributor = TorchDistributor(num_processes=processes, local_mode=local_mode, use_gpu=use_gpu)
        return self.run("train", processes, lambda: distributor.run(fn, arg))


# ---------------------------------------------------------------------------------------------
# task side of the plans above
def _ipc(table: Any) -> bytes:
    """``table`` as one zstd-compressed Arrow IPC stream."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _arrow_partition(fn: Callable[[Iterable], Iterable], blobs: Iterable[bytes]) -> Iterator[bytes]:
    """A :meth:`SparkEngine.map_arrow` task: ``fn`` over its key's record batches, its output as IPC."""
    import pyarrow as pa

    for blob in blobs:
        out = list(fn(iter(pa.ipc.open_stream(blob))))
        if out:
            yield _ipc(pa.Table.from_batches(out))


def _identity(key: int) -> int:
    return key


def _values_to(fn: Callable[[int, Iterable], Iterable], index: int, records: Iterable[tuple]) -> Iterable:
    """A step's task over one partition: ``fn(partition, its records' values)``."""
    return fn(index, (value for _, value in records))


def _large_star(edges: Any) -> Any:
    """Each node's larger neighbours linked to the smallest of its closed neighbourhood."""
    from pyspark.sql import functions as F

    both = edges.union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    low = both.groupBy("src").agg(F.min("dst").alias("m"))
    return both.join(low, "src").filter("dst > src") \
        .select(F.col("dst").alias("src"), F.least("m", "src").alias("dst")).distinct()


def _small_star(edges: Any) -> Any:
    """Each node and its smaller neighbours linked to the smallest of them."""
    from pyspark.sql import functions as F

    down = edges.select(F.greatest("src", "dst").alias("src"), F.least("src", "dst").alias("dst")).distinct()
    low = down.groupBy("src").agg(F.min("dst").alias("m"))
    pairs = down.join(low, "src")
    return pairs.select(F.col("dst").alias("src"), F.col("m").alias("dst")).filter("src != dst") \
        .union(pairs.select("src", F.col("m").alias("dst"))).distinct()


def _stars(edges: Any) -> Any:
    """Large-star and small-star rounds until a round changes no edge; then ``(node, component)``
    for every node but the components' smallest (each edge then links a node to it)."""
    from pyspark.sql import functions as F

    edges = edges.select(F.greatest("src", "dst").alias("src"), F.least("src", "dst").alias("dst")) \
        .distinct().localCheckpoint(eager=True)
    rounds = 0
    while True:
        rounds += 1
        nxt = _small_star(_large_star(edges)).localCheckpoint(eager=True)
        if nxt.count() == edges.count() and nxt.exceptAll(edges).isEmpty():
            break
        edges = nxt
    log.info("connected components: %d large-star / small-star rounds (the last one changed no edge)", rounds)
    return edges.groupBy("src").agg(F.min("dst").alias("component")).withColumnRenamed("src", "node")


def _tables_of(fn: Callable[[Any], Any], shared: Any, batches: Iterable) -> Iterator:
    """``mapInArrow`` body: ``fn`` of every item of this partition (rows: the items' indexes in the
    broadcast ``shared``), as record batches."""
    items = shared.value
    for b in batches:
        for i in b.column(0).to_pylist():
            yield from fn(items[i]).to_batches()


def _keys_of(keys: Callable[[Any], Any], shared: Any, key: str, batches: Iterable) -> Iterator:
    """``mapInArrow`` body: ``(item, key)`` rows of every item of this partition."""
    import pyarrow as pa

    items = shared.value
    for b in batches:
        for i in b.column(0).to_pylist():
            k = keys(items[i]).column(0).combine_chunks()
            yield pa.RecordBatch.from_arrays([pa.array([i] * len(k), pa.int64()), k], ["item", key])


def _matched_task(fn: Callable[[Any, Any], Any], shared: Any, schema: Any, table: Any) -> Any:
    """``applyInArrow`` body: ``fn(item, its matched lookup rows)``, as JSON (never pickled: the
    driver unpickles nothing)."""
    import json

    import pyarrow as pa

    i = int(table.column("item")[0].as_py())
    result = fn(shared.value[i], table.select(schema.names).cast(schema))
    return pa.table({"item": pa.array([i], pa.int64()), "result": pa.array([json.dumps(result).encode()], pa.binary())})
