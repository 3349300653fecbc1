"""The readers of an extraction output (``retrieval extract``): its manifest and its feature rows.

Apart from the stage (:mod:`retrieval.extract.job`) so that the stages that read features (index,
search, evaluate, fit) import the readers, never another stage's job.
"""
from __future__ import annotations

import pyarrow as pa

from retrieval import fsio, outputs
from retrieval.schema import column_matrix, feature_schema, int8_to_arrow


def read_manifest(output_url: str) -> dict:
    """The manifest of a COMPLETE extraction output (clear error otherwise)."""
    return outputs.read(output_url, "extract")


def binary_int8_fine(table: pa.Table) -> pa.Table:
    """A shard written before int8 codes were stored as ``fixed_size_binary`` (a
    ``fixed_size_list<int8>`` column) converted to the current form, so the shards of an output
    extended incrementally across that change concatenate."""
    if "fine" not in table.column_names:
        return table
    ftype = table.schema.field("fine").type
    if not (pa.types.is_fixed_size_list(ftype) and ftype.value_type == pa.int8()):
        return table
    i = table.column_names.index("fine")
    return table.set_column(i, pa.field("fine", pa.binary(ftype.list_size)),
                            int8_to_arrow(column_matrix(table.column("fine"))))


def read_features(output_url: str, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
    """All feature rows of a complete output (verifying each shard's sha256)."""
    manifest = read_manifest(output_url)
    tables = []
    for s in manifest["shards"]:
        url = fsio.join(output_url, fsio.safe_relpath(s["file"]))
        if verify and fsio.sha256_file(url) != s["sha256"]:
            raise ValueError(f"feature shard {url} does not match the sha256 in its manifest "
                             "(truncated or altered)")
        tables.append(binary_int8_fine(fsio.read_parquet(url, columns=columns)))
    if not tables:
        schema = feature_schema(storage=manifest.get("storage", "float32"))
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(tables)
