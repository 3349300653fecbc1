"""The lease of an output being written: one writer at a time (:mod:`retrieval.outputs` takes it).

A small JSON file (``_lease.json`` in an output folder, ``<file>.lease.json`` beside a file output:
owner, host, pid, stage, started, expires) created only if absent - locally by an atomic
``os.link`` of a written temporary file, on S3 by a conditional PUT (``If-None-Match: *``, s3fs's
``mode="create"``) - renewed by a heartbeat thread every ``seconds / 6`` while the stage runs, and
removed when the stage function returns or raises (:func:`leased`). A second writer while the lease
is live gets :class:`LeaseHeldError` naming the holder and the expiry; an expired lease (a killed
run) is taken over. The expiry is read against the reader's clock: hosts' clocks must agree to well
within ``io.lease_seconds`` (180 s by default, under the DAG's 10-minute retry delay).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from retrieval import fsio

log = logging.getLogger(__name__)

LEASE_SECONDS = 180.0        # io.lease_seconds' default


class LeaseHeldError(ValueError):
    """Another run is writing this output now (its lease has not expired)."""


_LOCAL = threading.local()


def held() -> list:
    if not hasattr(_LOCAL, "leases"):
        _LOCAL.leases = []
    return _LOCAL.leases


def leased(fn: Callable) -> Callable:
    """A stage function: the leases it claims are released when it returns or raises (then each
    lease's ``on_failure`` runs first: the claim undoes what it wrote when nothing else was)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        leases = held()
        mark = len(leases)
        failed = True
        try:
            out = fn(*args, **kwargs)
            failed = False
            return out
        finally:
            while len(leases) > mark:
                lease = leases.pop()
                if failed and lease.on_failure is not None:
                    try:
                        lease.on_failure()
                    except Exception as exc:     # best effort: the stage's own error matters
                        log.warning("%s: cleanup after the failure: %s", lease.output, exc)
                lease.release()
    return run


def _create(url: str, data: bytes) -> bool:
    """Create ``url`` holding ``data`` unless it exists (atomically); False when it exists."""
    fs, path = fsio.url_to_fs(url)
    proto = fsio.protocol_of(url)
    if proto in ("file", "local"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)           # atomic, fails when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        if proto in ("s3", "s3a"):
            fs.pipe_file(path, data, mode="create")      # PUT with If-None-Match: *
        else:                                            # no conditional write known: best effort
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
        return True
    except FileExistsError:
        return False


class Lease:
    """``_lease.json`` in the output: who writes it and until when (renewed every ``seconds / 6``)."""

    def __init__(self, url: str, output_url: str, stage: str, seconds: float = LEASE_SECONDS):
        self.url, self.output, self.stage, self.seconds = url, output_url, stage, float(seconds)
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_failure: Callable[[], None] | None = None
        self.pending_identity: dict | None = None      # written by outputs.commit (index --append)

    def body(self) -> bytes:
        expires = time.time() + self.seconds
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "stage": self.stage, "output": self.output, "started": _iso(self.started),
                           "expires": expires, "expires_at": _iso(expires)}).encode()

    def acquire(self) -> "Lease":
        for _ in range(3):
            if _create(self.url, self.body()):
                self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease {self.output}")
                self._thread.start()
                return self
            held = self.holder()
            if held is None:
                continue                                   # released meanwhile
            if float(held.get("expires", 0)) > time.time():
                raise LeaseHeldError(
                    f"{self.output} is being written by another run ({held.get('stage')} on "
                    f"{held.get('host')}, pid {held.get('pid')}, since {held.get('started')}); its lease "
                    f"expires at {held.get('expires_at')} unless renewed: wait for it, or write elsewhere")
            log.warning("%s: taking over the expired lease of %s pid %s (expired %s)", self.output,
                        held.get("host"), held.get("pid"), held.get("expires_at"))
            self._remove_if(held.get("owner"))
        raise LeaseHeldError(f"{self.output}: another run took the lease at the same moment")

    def holder(self) -> dict | None:
        try:
            h = fsio.read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:               # being written: treat as live for one lease period
            return {"expires": time.time() + self.seconds, "expires_at": "(unreadable lease)"}
        return h if isinstance(h, dict) else {}

    def _remove_if(self, owner: str | None) -> None:
        held = self.holder()
        if held is not None and held.get("owner") == owner:
            fs, path = fsio.url_to_fs(self.url)
            fs.rm(path)

    def _beat(self) -> None:
        while not self._stop.wait(max(0.2, self.seconds / 6)):
            try:
                if (self.holder() or {}).get("owner") != self.owner:
                    log.error("%s: the lease was taken by another run; this run no longer holds it", self.output)
                    return
                fs, path = fsio.url_to_fs(self.url)
                fs.pipe_file(path, self.body())
            except Exception as exc:     # a transient storage error: try again at the next beat
                log.warning("%s: lease renewal failed: %s", self.output, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._remove_if(self.owner)
        except Exception as exc:         # the lease expires by itself
            log.warning("%s: could not remove the lease: %s", self.output, exc)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
