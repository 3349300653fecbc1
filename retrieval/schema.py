"""Parquet schemas of the pipeline's outputs and the vector storage codecs.

Feature shards (``part-NNNNN.parquet``), one row per image, sorted by ``image_id``:

=============  ======================================  ===========================================
column         type                                    meaning
=============  ======================================  ===========================================
image_id       string                                  unique id (path relative to the input dir,
                                                       or the manifest / Parquet key)
uri            string                                  where the image was read from
coarse         fixed_size_list<float32>[128]           L2-normalised coarse code (always float32)
fine           fixed_size_binary[512] (storage=int8,   L2-normalised fine descriptor: 512 int8
               the default) or                         codes, one byte each; or float32 values
               fixed_size_list<float32>[512]
fine_scale     float32 (only with storage=int8)        ``fine_float = fine_int8 * fine_scale``
width, height  int32                                   original size, after EXIF orientation
model_version  string                                  fingerprint of the encoder
role           string                                  gallery | query
pdq            fixed_size_binary[32] (only with        PDQ hash of the FULL decoded image (not the
               ``extract.pdq=true``)                   model's draft-decoded, resized input): 256
                                                       bits, most significant first; hex = the
                                                       64-digit form hash lists exchange
pdq_quality    int32 (idem)                            PDQ quality 0-100 (under 50: a flat image,
                                                       its hash is unreliable)
pdq_dihedral   fixed_size_binary[224] (idem)           the hashes of the 7 rotations / flips of the
                                                       image (retrieval/hashing.py DIHEDRAL order)
region         string (only in query features with     null: the whole image; else the query region
               ``extract.query_regions``)              the row encodes, ``NAME:x0,y0,x1,y1``
                                                       (retrieval/extract/regions.py)
=============  ======================================  ===========================================

With query regions a query image has several rows (same ``image_id``): its whole-image row first,
then one per region, so the rows are no longer one per image; outputs without regions have no
``region`` column (their rows are all whole images), and every reader accepts both.

``int8`` storage quantises each fine vector symmetrically with its own scale
(``max|x| / 127``): 516 bytes instead of 2,048 per vector (Spark cannot read Parquet FLOAT16).
The codes are stored as one ``fixed_size_binary`` value per row, not as a list of 512 int8
values: Parquet decodes a list column element by element (repetition levels), which made
reading the rerank's row groups cost as much as the rerank itself; a binary value is one copy
(measured on a 125,000-row file: 0.056 s vs 0.31-0.56 s, and 30% smaller). Spark reads it as
``binary``. Outputs written with the earlier ``fixed_size_list<int8>`` form are still read.
Use :func:`fine_matrix` (float32) or :func:`column_matrix` (as stored) to read any form.
Feature files are written without dictionary encoding on the vector columns (a dictionary of
float or int8 values only costs space and time).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string())])

# search results (``retrieval search``): one row per (query, rank); docs/search.md.
# RESULT_SCHEMA_VERSION (the search manifest's ``schema_version`` and the Parquet key
# ``retrieval.schema_version``): 1 = up to norm_score; 2 = + fmr, fmr_query (estimated false-match
# rates, null without a background: retrieval/search/calibrate.py) and three columns reserved for
# later issues: query_region (the query region a match comes from; null = the whole image), signal
# (what scored the match: "descriptor", or "pdq" for the rows of `retrieval pdq match`) and distance
# (a hash distance: the PDQ Hamming distance, 0-256; null for descriptors). A "pdq" row's score and
# coarse_score are the hashes' cosine as +-1 vectors, 1 - 2 distance / 256 (retrieval/hashing.py);
# 3 = + inliers, geometric_error (search.geometric: the RANSAC inliers of local features between the
# query and gallery images of a query's top rows, and why a row could not be verified;
# retrieval/search/geometric.py). Both null when the row was not verified (off, or below its top).
RESULT_SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = b"retrieval.schema_version"
RESULT_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("rank", pa.int32()), ("gallery_id", pa.string()),
    ("score", pa.float32()), ("coarse_score", pa.float32()),
    ("query_uri", pa.string()), ("gallery_uri", pa.string()),
    ("norm_score", pa.float32()),     # score - beta x the query's background level (null: not normalised)
    ("fmr", pa.float64()),            # P(one unrelated gallery image scores >= norm_score) (null: no background)
    ("fmr_query", pa.float64()),      # P(>= 1 of the gallery's images does, none being related) (null: idem)
    ("query_region", pa.string()),    # reserved (regions): null = the whole query image
    ("signal", pa.string()),          # what scored the match: "descriptor" | "pdq"
    ("distance", pa.int32()),         # "pdq": the Hamming distance; null for descriptor matches
    ("inliers", pa.int32()),          # search.geometric: RANSAC inliers of local features (null: not verified)
    ("geometric_error", pa.string()),  # search.geometric: why the row could not be verified (null: fine)
], metadata={SCHEMA_VERSION_KEY: str(RESULT_SCHEMA_VERSION).encode()})
# columns a result file must have (version 1 outputs, and those written before norm_score existed, lack the rest)
RESULT_REQUIRED = ("query_id", "rank", "gallery_id", "score", "coarse_score", "query_uri", "gallery_uri")
# what conform_results fills a missing column with (None: nulls): every version-1 match was a descriptor's
_RESULT_FILL = {"signal": "descriptor"}


def conform_results(table: pa.Table) -> pa.Table:
    """A result table of any version in the current schema: missing newer columns become nulls
    (``signal``: "descriptor"), unknown columns are dropped; the schema carries the version."""
    for name in RESULT_SCHEMA.names:
        if name not in table.column_names:
            fill = _RESULT_FILL.get(name)
            typ = RESULT_SCHEMA.field(name).type
            col = pa.nulls(table.num_rows, typ) if fill is None else pa.array([fill] * table.num_rows, typ)
            table = table.append_column(name, col)
    return table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


def result_schema_version(schema: pa.Schema) -> int:
    """The version a result file was written with (1 when it does not say: written before versions)."""
    meta = schema.metadata or {}
    return int(meta.get(SCHEMA_VERSION_KEY, b"1"))


# columns written with dictionary encoding (the others are vectors or numbers)
DICTIONARY_COLUMNS = ["image_id", "uri", "model_version", "role"]
REGION = "region"           # the query-region column of query features (absent: whole images only)
# vector columns are stored uncompressed: zstd saves ~8% on int8 codes and float32 vectors but
# made reading them 5x slower (45 vs 9 ms per 125,000 rows of int8 codes), and the search reads
# every gallery row group it reranks from; the other columns are zstd-compressed
RAW_COLUMNS = ("coarse", "fine", "fine_scale", "pdq", "pdq_dihedral")
# bumped when the bytes of feature files change (benchmarks key their cached data on it):
# 2 = int8 codes as fixed_size_binary, 3 = vector columns uncompressed
FEATURE_LAYOUT = 3


def feature_compression(schema: pa.Schema) -> dict[str, str]:
    """Per-column Parquet codec of a feature file (``pq.ParquetWriter(compression=...)``)."""
    return {name: ("none" if name in RAW_COLUMNS else "zstd") for name in schema.names}


PDQ_COLUMNS = ("pdq", "pdq_quality", "pdq_dihedral")


def feature_schema(coarse_dim: int = 128, fine_dim: int = 512, storage: str = "float32",
                   pdq: bool = False, regions: bool = False) -> pa.Schema:
    fine_type = pa.binary(fine_dim) if storage == "int8" else pa.list_(pa.float32(), fine_dim)
    fields = [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("coarse", pa.list_(pa.float32(), coarse_dim)),
        ("fine", fine_type),
    ]
    if storage == "int8":
        fields.append(("fine_scale", pa.float32()))
    fields += [("width", pa.int32()), ("height", pa.int32()), ("model_version", pa.string()),
               ("role", pa.string())]
    if pdq:
        fields += [("pdq", pa.binary(32)), ("pdq_quality", pa.int32()), ("pdq_dihedral", pa.binary(224))]
    if regions:
        fields.append((REGION, pa.string()))
    return pa.schema(fields)


def vectors_to_arrow(x: np.ndarray, value_type: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """N x D array -> fixed_size_list<D> Arrow array (zero-copy for contiguous float32)."""
    x = np.ascontiguousarray(x)
    flat = pa.array(x.reshape(-1), type=value_type) if value_type is not None else pa.array(x.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def int8_to_arrow(q: np.ndarray) -> pa.FixedSizeBinaryArray:
    """N x D int8 codes -> ``fixed_size_binary[D]`` Arrow array (one value per row)."""
    q = np.ascontiguousarray(q, dtype=np.int8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(q.shape[1]), q.shape[0], [None, pa.py_buffer(q)])


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: returns (codes int8 N x D, scales float32 N)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list (or list) column -> N x D numpy array (float32 or int8 as stored);
    fixed_size_binary[D] (int8 codes) -> N x D int8 (a read-only view of the Arrow buffer)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_binary(column.type):
        dim = column.type.byte_width
        if column.null_count:
            raise ValueError("vector column has null rows")
        data = np.frombuffer(column.buffers()[1], dtype=np.int8)
        return data[column.offset * dim:(column.offset + len(column)) * dim].reshape(len(column), dim)
    if len(column) == 0:
        size = getattr(column.type, "list_size", 0)
        return np.zeros((0, size), dtype=column.type.value_type.to_pandas_dtype())
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:  # variable lists (e.g. written by Spark): all rows must have the same length
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        dim = int(lengths[0])
        if not (lengths == dim).all():
            raise ValueError("vector column has rows of different lengths")
    if column.null_count:
        raise ValueError("vector column has null rows")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), dim)


def fine_matrix(table: pa.Table) -> np.ndarray:
    """The float32 fine vectors of a feature table, whatever the storage."""
    fine = column_matrix(table.column("fine"))
    if fine.dtype == np.int8:
        return dequantize_int8(fine, table.column("fine_scale").to_numpy())
    return fine.astype(np.float32, copy=False)


def coarse_matrix(table: pa.Table) -> np.ndarray:
    return column_matrix(table.column("coarse")).astype(np.float32, copy=False)
