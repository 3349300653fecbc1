"""The uri a groups row gets (retrieval.duplicates.job._uris): the same rule as the Spark path's
groupBy max (retrieval/engine/graph.py), whatever the pairs' order."""
from __future__ import annotations

import pyarrow as pa

from retrieval.duplicates.job import _uris


def test_an_id_seen_with_two_uris_gets_the_greatest_on_either_order():
    pairs = pa.table({"query_id": ["a", "b", "a"], "gallery_id": ["b", "a", "c"],
                      "query_uri": ["s3://x/a2.jpg", "s3://x/b.jpg", "s3://x/a1.jpg"],
                      "gallery_uri": ["s3://x/b.jpg", "s3://x/a1.jpg", "s3://x/c.jpg"]})
    want = {"a": "s3://x/a2.jpg", "b": "s3://x/b.jpg", "c": "s3://x/c.jpg"}
    assert _uris(pairs) == want
    assert _uris(pairs.take([2, 1, 0])) == want
