"""Ordered look-ahead map on threads: decode the next images while the model runs on this batch.

``ordered_map(fn, items, workers, ahead)`` yields ``fn(item)`` for each item, in the items' order, with
up to ``ahead`` items read (a feeder thread pulls ``items``, which may do I/O) and handed to ``workers``
threads before the consumer asks for them. The C decoders and torch's resize release the GIL, so
the decode threads run while the consumer's thread is in the model's forward (which releases it too).

The consumer can stop at any time (an exception in its loop, or ``close()`` on the generator): the
feeder stops at its next item, and no thread outlives the generator. An exception raised by ``items``
or by ``fn`` is raised in the consumer at that item's place.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def _feed(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, out: queue.Queue,
          stop: threading.Event) -> None:
    """The feeder thread: submit each item to the pool, queue its future (blocking while ``ahead`` wait)."""
    try:
        for item in items:
            fut = pool.submit(fn, item)
            while not stop.is_set():
                try:
                    out.put(fut, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                fut.cancel()
                return
        _put(out, _END, stop)
    except BaseException as exc:   # raised by the items iterator: the consumer re-raises it
        failed: Future = Future()
        failed.set_exception(exc)
        _put(out, failed, stop)
        _put(out, _END, stop)


def _put(out: queue.Queue, value: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(value, timeout=0.1)
            return
        except queue.Full:
            continue


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` computed by ``workers`` threads up to ``ahead`` items ahead (see the module)."""
    workers, ahead = max(1, int(workers)), max(1, int(ahead))
    out: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    feeder = threading.Thread(target=_feed, args=(fn, items, pool, out, stop), name="decode-feed", daemon=True)
    feeder.start()
    try:
        while True:
            fut = out.get()
            if fut is _END:
                return
            yield fut.result()
    finally:
        stop.set()
        while True:        # unblock the feeder, drop what it queued
            try:
                f = out.get_nowait()
            except queue.Empty:
                break
            if isinstance(f, Future):
                f.cancel()
        feeder.join()
        pool.shutdown(wait=True, cancel_futures=True)
