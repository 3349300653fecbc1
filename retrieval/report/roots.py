"""Which images the report may read: only those under the input roots the run's manifests record.

A result row names its images by URI, and the report reads the bytes of the shown ones to make
thumbnails. A result file is data, not a source of truth about what may be read: a planted row
naming ``/etc/passwd`` or ``s3://other-bucket/x.jpg`` must not make the report read it. The roots
are the ``input`` URLs of the extraction manifests behind the results (the query features named
by the search manifest, the gallery features listed by the index manifest): a directory input is
its own root, a file input (a CSV / Parquet listing or a Parquet-bytes file) roots its directory.
Local paths are compared after ``realpath`` (no ``..`` or symlink escapes); other URLs after
normalising their path; the scheme must match. Parquet-bytes URIs (``<file>#row=<n>``) are
checked by their file. A relative input (as the extraction was given it) is taken relative to the
report's working directory.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Iterable

from retrieval.extract.inputs import ROW_MARK

FILE_INPUT_SUFFIXES = (".csv", ".parquet")


def _split(url: str) -> tuple[str, str]:
    """``(scheme, normalised path)``; the local scheme is ``""`` (``file://`` included)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    scheme = scheme.lower()
    if scheme in ("", "file", "local"):
        return "", os.path.realpath(rest) if rest else ""
    return scheme, posixpath.normpath("/" + rest.lstrip("/"))


def root_of(input_url: str) -> tuple[str, str]:
    """The root of one recorded input: the directory itself, or a file input's directory."""
    scheme, path = _split(input_url.rstrip("/") or input_url)
    if path.lower().endswith(FILE_INPUT_SUFFIXES):
        path = posixpath.dirname(path)
    return scheme, path


@dataclass(frozen=True)
class InputRoots:
    roots: tuple[tuple[str, str], ...]

    @classmethod
    def from_inputs(cls, input_urls: Iterable[str | None]) -> "InputRoots":
        roots = [root_of(str(u)) for u in input_urls if u]
        return cls(tuple(dict.fromkeys(r for r in roots if r[1])))

    def allows(self, uri: str | None) -> bool:
        """Whether ``uri`` lies under one of the roots."""
        if not uri:
            return False
        if ROW_MARK in uri:
            uri = uri.rsplit(ROW_MARK, 1)[0]
        scheme, path = _split(uri)
        for r_scheme, r_path in self.roots:
            if scheme == r_scheme and (path == r_path or path.startswith(r_path.rstrip("/") + "/")):
                return True
        return False

    def describe(self) -> str:
        if not self.roots:
            return "none recorded"
        return ", ".join(f"{s}://{p.lstrip('/')}" if s else p for s, p in self.roots)
