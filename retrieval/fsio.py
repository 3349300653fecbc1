"""Filesystem helpers over fsspec: every path is a URL (local path, file://, s3://, memory://...).

Writes are atomic at the file level: data goes to a temporary name beside the target and is
renamed into place, so a reader never sees a half-written file (on object stores the final key
appears only once the upload is complete).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

__all__ = ["configure", "arrow_fs", "parquet_file", "read_parquet", "url_to_fs", "join", "exists", "read_bytes", "read_text", "write_bytes", "write_json",
           "read_json", "atomic_open", "sha256_file", "sha256_bytes", "safe_relpath",
           "UnsafePathError", "StorageError", "describe_error", "ensure_writable", "protocol_of", "strip_protocol", "to_url"]


class UnsafePathError(ValueError):
    """A relative path from input data would escape its root (``..``, absolute, or a scheme)."""


class StorageError(OSError):
    """A URL that could not be reached or read for another reason than its absence: no or wrong
    credentials, an unreachable endpoint (:func:`describe_error` words the message)."""


def configure(storage_options: dict | None) -> None:
    """Apply per-protocol fsspec options (config ``io.storage_options``) in this process: the driver
    and every Spark task call this, since executors do not share the driver's environment."""
    for protocol, options in (storage_options or {}).items():
        current = fsspec.config.conf.setdefault(protocol, {})
        if any(current.get(k) != v for k, v in options.items()):
            current.update(options)
            cls = fsspec.get_filesystem_class(protocol)
            cls.clear_instance_cache()


def arrow_fs(url: str):
    """``(pyarrow FileSystem, path)`` for reading ``url`` with pyarrow's own I/O.

    Parquet must NOT be read through Python file objects: with torch loaded, pyarrow's thread pool
    then aborts the interpreter at exit about half the time ("terminate called without an active
    exception"; apache/arrow#50482, #34314), which turns a finished job into exit code 134. Local
    paths and ``s3://`` use pyarrow's native filesystems (S3 options come from ``io.storage_options``
    / fsspec's config: endpoint_url, key, secret); other protocols fall back to fsspec's handler."""
    from pyarrow import fs as pafs

    fs, path = url_to_fs(url)
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return pafs.LocalFileSystem(), path
    if proto in ("s3", "s3a"):
        opts = {**fsspec.config.conf.get("s3", {}), **getattr(fs, "storage_options", {})}
        kwargs: dict[str, Any] = {}
        if opts.get("endpoint_url"):
            kwargs["endpoint_override"] = opts["endpoint_url"]
        if opts.get("key"):
            kwargs["access_key"], kwargs["secret_key"] = opts["key"], opts.get("secret")
        if opts.get("anon"):
            kwargs["anonymous"] = True
        region = opts.get("client_kwargs", {}).get("region_name") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return _s3_fs(tuple(sorted(kwargs.items()))), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@functools.lru_cache(maxsize=8)
def _s3_fs(items: tuple):
    from pyarrow import fs as pafs

    return pafs.S3FileSystem(**dict(items))


def parquet_file(url: str):
    """A ``pyarrow.parquet.ParquetFile`` read with pyarrow's own I/O (see :func:`arrow_fs`)."""
    import pyarrow.parquet as pq

    afs, path = arrow_fs(url)
    return pq.ParquetFile(afs.open_input_file(path))


def read_parquet(url: str, columns: list[str] | None = None):
    """A whole Parquet file as a table, read with pyarrow's own I/O (see :func:`arrow_fs`)."""
    import pyarrow.parquet as pq

    afs, path = arrow_fs(url)
    return pq.read_table(path, columns=columns, filesystem=afs)


def protocol_of(url: str) -> str:
    fs, _ = url_to_fs(url)
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def strip_protocol(url: str) -> str:
    return url_to_fs(url)[1]


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of url_to_fs: a URL that resolves to ``path`` on ``fs``."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def safe_relpath(rel: str) -> str:
    """Normalise a relative path taken from input data and refuse anything that could escape
    the directory it is joined to."""
    if not rel or "\x00" in rel:
        raise UnsafePathError(f"empty or NUL-containing path {rel!r}")
    if "://" in rel or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(f"path {rel!r} is absolute or has a scheme")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise UnsafePathError(f"path {rel!r} escapes its root")
    return norm


def exists(url: str) -> bool:
    """Whether ``url`` exists; a :class:`StorageError` naming the URL when it cannot be known (no or
    wrong credentials, an unreachable endpoint). fsspec's HTTP ``exists`` takes a refused
    connection for absence: HTTP URLs are asked for their info instead."""
    fs, path = url_to_fs(url)
    try:
        if protocol_of(url) in ("http", "https"):
            try:
                fs.info(path)
                return True
            except FileNotFoundError as exc:    # fsspec's, also for a refused connection
                if describe_error(exc) is None:
                    return False
                raise
        return fs.exists(path)
    except Exception as exc:
        msg = describe_error(exc)
        if msg is None:
            raise
        raise StorageError(f"{url}: {msg}") from exc


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``url`` for writing through a temporary sibling; renamed into place on success,
    removed on failure."""
    fs, path = url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}" if parent else \
        f".tmp-{uuid.uuid4().hex}-{path}"
    try:
        with fs.open(tmp, mode) as fh:
            yield fh
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # pragma: no cover - best effort cleanup
            pass
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as fh:
        fh.write(data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_root() -> str:
    """This user's cache folder of the project (verified-once record, the driver JVM's class archive):
    ``$RETRIEVAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/retrieval``, else ``~/.cache/retrieval``."""
    return os.environ.get("RETRIEVAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "retrieval")


def sha256_file(url: str, chunk: int = 1 << 22) -> str:
    fs, path = url_to_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def remove_stale(output: str, prefix: str, subdirs: tuple[str, ...], keep: set[int] | None) -> None:
    """In ``output`` and its ``subdirs``: remove temporary files of dead attempts (``.tmp-*``) and,
    unless ``keep`` is None, every ``{prefix}-NNNNN*`` file whose number is not in ``keep``
    (shards of an earlier, different plan)."""
    fs, root = url_to_fs(output)
    for sub in ("", *subdirs):
        d = f"{root.rstrip('/')}/{sub.strip('/')}".rstrip("/")
        if not fs.exists(d):
            continue
        for p in fs.ls(d, detail=False):
            base = p.rsplit("/", 1)[-1]
            if base.startswith(".tmp-"):
                fs.rm(p)
            elif keep is not None and base.startswith(prefix + "-"):
                number = base[len(prefix) + 1:len(prefix) + 6]
                if number.isdigit() and int(number) not in keep:
                    fs.rm(p)


def ensure_writable(url: str) -> None:
    """Fail early, with the URL in the message, if ``url`` (a directory) cannot be written."""
    fs, path = url_to_fs(url)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise PermissionError(f"output {url} is not writable: {describe_error(exc) or exc}") from exc


# ---------------------------------------------------------------------------------------------
# one-line messages for storage errors (the CLI prints them instead of a traceback)
_S3_CREDENTIALS = "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or io.storage_options.s3.key + secret"
_S3_REFUSED = {"InvalidAccessKeyId": "InvalidAccessKeyId: the access key is not known to the server",
               "SignatureDoesNotMatch": "SignatureDoesNotMatch: the secret key does not match the access key",
               "ExpiredToken": "ExpiredToken: the session token has expired",
               "InvalidToken": "InvalidToken: the session token is not valid",
               "AccessDenied": "AccessDenied", "403": "403 Forbidden"}
# exception class names met in a Spark task's error text (the driver sees a Java trace)
_IN_TASK_TEXT = re.compile(r"\b(NoCredentialsError|PartialCredentialsError|EndpointConnectionError|"
                           r"ConnectTimeoutError|ClientConnectorError): ([^\n]+)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one(exc: BaseException) -> str | None:
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"no S3 credentials found ({exc}): set {_S3_CREDENTIALS}"
    if name == "ClientError":                   # botocore: the server answered with an error code
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in _S3_REFUSED:
            return (f"S3 refused the request ({_S3_REFUSED[code]}): check the credentials "
                    f"({_S3_CREDENTIALS}) and the bucket's permissions")
        if code in ("NoSuchBucket", "404"):
            return f"S3: no such bucket or key ({code}: {exc})"
        return None
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return f"cannot reach the storage endpoint: {exc} (check io.storage_options' endpoint_url and the network)"
    if name in ("ClientConnectorError", "ServerTimeoutError", "ClientConnectionError"):
        return f"cannot reach the server: {exc}"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot connect: {exc}"
    return None


def describe_error(exc: BaseException) -> str | None:
    """A one-line message for a storage error (missing or wrong credentials, an unreachable endpoint
    or URL), from ``exc`` or the errors it was raised from (s3fs wraps botocore's; a Spark task's
    error arrives as the text of a Java trace); None for any other error."""
    for e in _chain(exc):
        msg = _one(e)
        if msg is not None:
            return " ".join(msg.split())
    m = _IN_TASK_TEXT.search(str(exc))
    if m:
        kind = m.group(1)
        if "Credentials" in kind:
            return f"no S3 credentials found in a Spark task ({m.group(2).strip()}): set {_S3_CREDENTIALS}"
        return f"cannot reach the storage endpoint from a Spark task: {m.group(2).strip()}"
    return None
