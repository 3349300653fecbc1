"""Image inputs: list them (on the driver) and read their bytes (in the tasks).

Three input kinds, any fsspec URL:
- ``dir``: every file under a directory, recursively (hidden files and ``_``-prefixed markers
  skipped); ``image_id`` is the path relative to the directory (``sub/cat.jpg``).
- ``manifest``: a CSV or Parquet file with ``image_id`` and ``uri`` columns; relative URIs are
  resolved against the manifest's directory.
- ``parquet``: img2dataset-style Parquet holding the bytes (a key column and a bytes column);
  ``uri`` becomes ``<file>#row=<n>`` and the bytes are read by the task that owns the file.

The listing is a pyarrow table ``image_id, uri, shard, error``: ``shard`` is a stable function of
the item (crc32 of the id, or the Parquet file for bytes inputs), ``error`` is set for items that
are refused before reading (a duplicate ``image_id``: the first occurrence wins).
"""
from __future__ import annotations

import functools
import io
import os
import posixpath
import zlib
from collections import defaultdict
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv

from retrieval import fsio

LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                            ("shard", pa.int32()), ("error", pa.string())])
ROW_MARK = "#row="
KEY_CANDIDATES = ("key", "image_id", "id")
BYTES_CANDIDATES = ("jpg", "image", "bytes", "data", "png", "webp")


class InputError(ValueError):
    """The input as a whole is unusable (missing, empty, wrong columns)."""


def shard_of(image_id: str, num_shards: int) -> int:
    return zlib.crc32(image_id.encode("utf-8")) % num_shards


def detect_format(url: str) -> str:
    fs, path = fsio.url_to_fs(url)
    if not fsio.exists(url):     # StorageError when it cannot be known (credentials, network)
        raise InputError(f"input not found: {url}")
    if fs.isdir(path):
        files = [p for p in fs.find(path) if not _hidden(p, path)]
        if files and all(p.endswith(".parquet") for p in files):
            schema = fsio.parquet_file(fsio.to_url(fs, files[0])).schema_arrow
            return "manifest" if "uri" in schema.names else "parquet"
        return "dir"
    if path.endswith(".csv"):
        return "manifest"
    if path.endswith(".parquet"):
        schema = fsio.parquet_file(url).schema_arrow
        return "manifest" if "uri" in schema.names else "parquet"
    raise InputError(f"input {url}: a single file must be a .csv or .parquet manifest")


def _hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root.rstrip("/"))
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_dir(url: str) -> list[tuple[str, str]]:
    fs, root = fsio.url_to_fs(url)
    root = root.rstrip("/")
    out = []
    for p in sorted(fs.find(root)):
        if _hidden(p, root):
            continue
        out.append((posixpath.relpath(p, root), fsio.to_url(fs, p)))
    return out


def _read_table(url: str) -> pa.Table:
    fs, path = fsio.url_to_fs(url)
    if fs.isdir(path):
        parts = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(p, path))
        return pa.concat_tables([fsio.read_parquet(fsio.to_url(fs, p)) for p in parts]) if parts \
            else pa.table({})
    if path.endswith(".csv"):
        afs, apath = fsio.arrow_fs(url)
        with afs.open_input_stream(apath) as fh:
            return pacsv.read_csv(fh, convert_options=pacsv.ConvertOptions(
                column_types={"image_id": pa.string(), "uri": pa.string()}))
    return fsio.read_parquet(url)


def _resolve(uri: str, base_fs, base_dir: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return fsio.to_url(base_fs, posixpath.normpath(posixpath.join(base_dir, uri)))


def _list_manifest(url: str) -> list[tuple[str, str]]:
    table = _read_table(url)
    missing = {"image_id", "uri"} - set(table.column_names)
    if missing:
        raise InputError(f"manifest {url}: missing column(s) {sorted(missing)}; "
                         f"found {table.column_names}")
    fs, path = fsio.url_to_fs(url)
    base_dir = path if fs.isdir(path) else posixpath.dirname(path)
    ids = table.column("image_id").to_pylist()
    uris = table.column("uri").to_pylist()
    out = []
    for i, (image_id, uri) in enumerate(zip(ids, uris)):
        image_id = "" if image_id is None else str(image_id)
        uri = "" if uri is None else str(uri)
        out.append((image_id, _resolve(uri, fs, base_dir) if uri else ""))
    return out


def parquet_columns(schema: pa.Schema, key_column: str | None, bytes_column: str | None,
                    url: str) -> tuple[str, str]:
    """The (key, bytes) columns: the configured ones, or for ``auto`` (None) the first candidates present."""
    key_column, bytes_column = (None if c == "auto" else c for c in (key_column, bytes_column))
    key = key_column or next((c for c in KEY_CANDIDATES if c in schema.names), None)
    data = bytes_column or next((c for c in BYTES_CANDIDATES if c in schema.names
                                 and pa.types.is_binary(schema.field(c).type)
                                 or c in schema.names and pa.types.is_large_binary(schema.field(c).type)),
                                None)
    if key is None or key not in schema.names:
        raise InputError(f"parquet input {url}: no key column (set extract.key_column; "
                         f"columns: {schema.names})")
    if data is None or data not in schema.names:
        raise InputError(f"parquet input {url}: no bytes column (set extract.bytes_column; "
                         f"columns: {schema.names})")
    return key, data


def _parquet_files(url: str) -> list[str]:
    fs, path = fsio.url_to_fs(url)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(p, path))
    else:
        files = [path]
    return [fsio.to_url(fs, p) for p in files]


def list_inputs(url: str, input_format: str = "auto", num_shards: int = 1,
                key_column: str | None = None, bytes_column: str | None = None) -> pa.Table:
    """The listing table of an input (see module doc). Raises :class:`InputError` if the input
    is missing or holds nothing."""
    fmt = detect_format(url) if input_format == "auto" else input_format
    items: list[tuple[str, str, int]] = []
    if fmt == "dir":
        items = [(i, u, shard_of(i, num_shards)) for i, u in _list_dir(url)]
    elif fmt == "manifest":
        items = [(i, u, shard_of(i, num_shards)) for i, u in _list_manifest(url)]
    elif fmt == "parquet":
        for file_no, f in enumerate(_parquet_files(url)):
            pf = fsio.parquet_file(f)
            key, _ = parquet_columns(pf.schema_arrow, key_column, bytes_column, f)
            keys = pf.read(columns=[key]).column(key).to_pylist()
            shard = file_no % num_shards
            items += [("" if k is None else str(k), f"{f}{ROW_MARK}{r}", shard) for r, k in enumerate(keys)]
    else:
        raise InputError(f"unknown input format {fmt!r}")
    if not items:
        raise InputError(f"input {url} ({fmt}) holds no images")
    seen: set[str] = set()
    errors: list[str | None] = []
    for image_id, uri, _ in items:
        if not image_id:
            errors.append("missing image_id")
        elif not uri:
            errors.append("missing uri")
        elif image_id in seen:
            errors.append("duplicate image_id (the first occurrence is processed)")
        else:
            errors.append(None)
        seen.add(image_id)
    return pa.table({"image_id": [i for i, _, _ in items], "uri": [u for _, u, _ in items],
                     "shard": pa.array([s for _, _, s in items], pa.int32()),
                     "error": pa.array(errors, pa.string())}, schema=LISTING_SCHEMA)


def read_items(rows: list[tuple[str, str]], max_bytes: int, key_column: str | None = None,
               bytes_column: str | None = None) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    """Yield ``(image_id, uri, bytes, error)`` in the order given. Files are read through fsspec
    (at most ``max_bytes + 1`` bytes); Parquet-bytes items are read file by file, streaming."""
    by_file: dict[str, dict[int, int]] = defaultdict(dict)
    for idx, (_, uri) in enumerate(rows):
        if ROW_MARK in uri:
            f, r = uri.rsplit(ROW_MARK, 1)
            by_file[f][int(r)] = idx
    from_parquet: dict[int, bytes | None] = {}
    errors: dict[int, str] = {}
    for f, wanted in by_file.items():
        try:
            pf = fsio.parquet_file(f)
            key, col = parquet_columns(pf.schema_arrow, key_column, bytes_column, f)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=[col]):
                values = batch.column(0)
                for j in range(len(values)):
                    if row + j in wanted:
                        from_parquet[wanted[row + j]] = values[j].as_py()
                row += len(values)
        except Exception as exc:
            for idx in wanted.values():
                errors[idx] = f"unreadable parquet input {f}: {exc.__class__.__name__}: {exc}"
    for idx, (image_id, uri) in enumerate(rows):
        if idx in errors:
            yield image_id, uri, None, errors[idx]
        elif ROW_MARK in uri:
            data = from_parquet.get(idx)
            yield image_id, uri, data, None if data is not None else "null bytes in parquet input"
        else:
            yield (image_id, uri, *_read_file(uri, max_bytes))


def _read_file(uri: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    if uri.startswith("/"):       # a local path, as listings make them: the built-in open (fsspec's own
        opener = functools.partial(open, uri, "rb")    # resolution of each URL costs ~0.6 ms an image)
    else:
        try:
            fs, path = fsio.url_to_fs(uri)
        except Exception as exc:
            return None, f"unreadable uri: {exc.__class__.__name__}: {exc}"
        opener = functools.partial(fs.open, path, "rb")
    try:
        with opener() as fh:
            data = _read_capped(fh, max_bytes)
    except FileNotFoundError:
        return None, "missing file: not found"
    except IsADirectoryError:
        return None, "unreadable uri: is a directory"
    except Exception as exc:
        return None, f"unreadable uri: {exc.__class__.__name__}: {exc}"
    if len(data) > max_bytes:
        return None, f"file too large: > max_bytes {max_bytes}"
    return data, None


def _read_capped(fh, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of an open file (one more than allowed: the caller sees a file too
    large), read in one call of the file's own size when it is known: ``read(max_bytes + 1)`` alone makes
    Python allocate the whole cap (50 MB by default) for every image, ~0.5 ms per read. A size that is
    wrong (the file grew) only costs a second read."""
    size = getattr(fh, "size", None)
    if size is None and hasattr(fh, "fileno"):
        try:
            size = os.fstat(fh.fileno()).st_size
        except (OSError, ValueError, io.UnsupportedOperation):
            size = None
    if not isinstance(size, int) or size < 0 or size > max_bytes:
        return fh.read(max_bytes + 1)
    data = fh.read(size + 1)
    if len(data) == size + 1:       # larger than its size said: read on, up to the cap
        data += fh.read(max_bytes - size)
    return data
