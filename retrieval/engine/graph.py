"""The Spark side of :meth:`retrieval.engine.Engine.graph_groups`: the groups of a graph of scored
pairs made and written in DataFrame operations, so that neither the pairs nor the ``(node,
component)`` rows reach the driver (only counts, the group-size counts and the largest groups do).

The rows are those of the in-memory path (:func:`retrieval.duplicates.groups.make_groups`):
``degree`` a groupBy over the unordered pairs, ``size`` a groupBy over the components,
``representative`` the first of a window over ``(degree desc, node)`` per component, ``group_id``
the index of the component in ``(size desc, component)`` order (a sort and ``zipWithIndex``, not a
one-partition window); both tables sorted, then written by tasks, one part file per partition in
sort order.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator


def groups_of(pairs: Any, components: Any, write: Callable[[str, int, Any], str], largest: int) -> dict:
    """``pairs``: DataFrame ``(query_id, gallery_id, query_uri, gallery_uri, score, norm_score)``;
    ``components``: ``(node, component)``. Writes ``groups`` and ``edges`` through ``write(name,
    part, table) -> file`` in tasks; returns ``{"pairs_kept", "edges", "sizes", "largest", "files"}``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    und = pairs.select(F.least("query_id", "gallery_id").alias("image_a"),
                       F.greatest("query_id", "gallery_id").alias("image_b"), "score", "norm_score") \
        .groupBy("image_a", "image_b").agg(F.max("score").alias("score"), F.max("norm_score").alias("norm_score"))
    deg = und.select(F.col("image_a").alias("node")).unionAll(und.select(F.col("image_b").alias("node"))) \
        .groupBy("node").agg(F.count(F.lit(1)).cast("int").alias("degree"))
    size = components.groupBy("component").agg(F.count(F.lit(1)).alias("size"))
    members = components.join(size, "component").filter("size >= 2").join(deg, "node", "left") \
        .fillna(0, ["degree"]).localCheckpoint(eager=True)
    comps = members.select("component", "size").distinct().orderBy(F.desc("size"), "component")
    spark = pairs.sparkSession
    gid = spark.createDataFrame(comps.rdd.zipWithIndex().map(lambda r: (r[0][0], r[1])),
                                "component " + comps.schema["component"].dataType.simpleString() + ", group_id long")
    rank = Window.partitionBy("component").orderBy(F.desc("degree"), "node")
    rep = members.withColumn("r", F.row_number().over(rank)).filter("r = 1") \
        .select("component", F.col("node").alias("representative"))
    uris = pairs.select(F.col("query_id").alias("node"), F.col("query_uri").alias("uri")) \
        .unionAll(pairs.select("gallery_id", "gallery_uri")).groupBy("node").agg(F.max("uri").alias("uri"))
    groups = members.join(gid, "component").join(rep, "component").join(uris, "node", "left") \
        .select(F.col("node").alias("image_id"), "uri", "group_id", "representative",
                F.col("size").cast("long").alias("size"), F.col("degree").cast("int").alias("degree")) \
        .orderBy("group_id", "image_id").localCheckpoint(eager=True)
    edges = und.join(members.select(F.col("node").alias("image_a"), "component"), "image_a") \
        .join(gid, "component").select("image_a", "image_b", F.col("score").cast("float").alias("score"),
                                        F.col("norm_score").cast("float").alias("norm_score"), "group_id") \
        .orderBy("image_a", "image_b")
    files = _write(groups, "groups", write) + _write(edges, "edges", write)
    sizes = {int(r["size"]): int(r["n"]) for r in
             members.select("component", "size").distinct().groupBy("size").agg(F.count(F.lit(1)).alias("n"))
             .collect()}
    top = [r.asDict() for r in groups.filter(F.col("group_id") < largest)
           .select("group_id", "size", "representative").distinct().orderBy("group_id").collect()]
    return {"pairs_kept": pairs.count(), "edges": und.count(), "sizes": sizes, "largest": top, "files": files}


def _write(frame: Any, name: str, write: Callable[[str, int, Any], str]) -> list[str]:
    """``frame``'s partitions written by tasks (``write(name, partition, table)``), in order: the
    files' names (empty partitions write none)."""
    import functools

    got = frame.mapInArrow(functools.partial(_write_part, write, name), "file string").collect()
    return sorted(r["file"] for r in got)


def _write_part(write: Callable[[str, int, Any], str], name: str, batches: Iterable) -> Iterator:
    import pyarrow as pa
    from pyspark import TaskContext

    got = list(batches)
    rows = sum(b.num_rows for b in got)
    if rows:
        yield pa.RecordBatch.from_pydict({"file": [write(name, TaskContext.get().partitionId(),
                                                         pa.Table.from_batches(got))]})
