"""Checking files against the sha256 recorded in the manifest that lists them.

Every stage reads its inputs through a manifest written by the stage before (docs/reliability.md):
a file that is missing, truncated or altered since is refused with :class:`IntegrityError`,
naming the file, before any result is written. :func:`verify_files` checks a list of files,
hashing them in parallel: as Spark tasks (one per file; only ``(url, digest)`` pairs travel back,
and the comparison happens on the driver, so the error is a clear driver-side exception, not a
task failure buried in a Java stack trace), or in threads locally.
"""
from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from retrieval import fsio

log = logging.getLogger(__name__)


class IntegrityError(ValueError):
    """A file does not match the sha256 its manifest records (or is missing)."""


def _digest(storage_options: dict | None, url: str) -> tuple[str, str | None]:
    fsio.configure(storage_options)
    try:
        return url, fsio.sha256_file(url)
    except FileNotFoundError:
        return url, None


def verify_files(files: Sequence[tuple[str, str | None]], what: str, manifest: str, spark=None,
                 storage_options: dict | None = None, threads: int = 4) -> int:
    """Check each ``(url, sha256)`` (entries without a sha256 are skipped); raise
    :class:`IntegrityError` naming the first bad file and ``manifest`` (the manifest that records
    it). Returns the number of files checked."""
    wanted = {url: sha for url, sha in files if sha}
    if not wanted:
        return 0
    hash_one = functools.partial(_digest, storage_options)
    urls = sorted(wanted)
    if spark is not None and len(urls) > 1:
        got = dict(spark.sparkContext.parallelize(urls, len(urls)).map(hash_one).collect())
    else:
        with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
            got = dict(pool.map(hash_one, urls))
    for url in urls:
        if got.get(url) is None:
            raise IntegrityError(f"{what} {url} (listed in {manifest}) is missing")
        if got[url] != wanted[url]:
            raise IntegrityError(f"{what} {url} does not match the sha256 recorded in {manifest} "
                                 "(truncated or altered since it was written)")
    log.info("verified %d %s files against %s", len(urls), what, manifest)
    return len(urls)
