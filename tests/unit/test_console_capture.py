"""retrieval.console: what C/C++ code prints on file descriptor 2 (faiss's k-means warning) is
captured around the call and forwarded to the logger ``retrieval.thirdparty``; the console's own
stream still reaches the terminal meanwhile; nested and concurrent captures restore fd 2."""
from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from retrieval.console import STDERR, forward, native_output


def _kmeans_with_too_few_points() -> None:
    import faiss

    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    faiss.Kmeans(8, 16, niter=2, seed=1).train(x)      # faiss: "WARNING clustering 30 points to 16 centroids ..."


def test_faiss_warning_goes_to_the_logger_not_to_fd2(capfd, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.thirdparty")
    _kmeans_with_too_few_points()                        # uncaptured: faiss writes to fd 2 itself
    assert "WARNING clustering 30 points to 16 centroids" in capfd.readouterr().err
    with native_output("faiss"):
        _kmeans_with_too_few_points()
        os.write(2, b"an info line from C\n")
    assert "clustering" not in capfd.readouterr().err
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "retrieval.thirdparty"]
    assert records[0][0] == logging.WARNING and records[0][1].startswith("faiss: WARNING clustering 30 points "
                                                                           "to 16 centroids: please provide")
    assert records[-1] == (logging.INFO, "faiss: an info line from C")


def test_console_stream_reaches_the_terminal_during_a_capture(capfd, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.thirdparty")
    with native_output("lib"):
        os.write(2, b"hidden from the console\n")
        STDERR.write("shown on the console\n")
        STDERR.flush()
    err = capfd.readouterr().err
    assert "shown on the console" in err and "hidden from the console" not in err
    assert [r.getMessage() for r in caplog.records] == ["lib: hidden from the console"]


def test_concurrent_and_nested_captures_restore_fd2(capfd, caplog):
    caplog.set_level(logging.INFO, logger="retrieval.thirdparty")
    before = os.fstat(2)

    def work(t: int) -> None:
        for i in range(20):
            with native_output("faiss"):
                with native_output("faiss"):
                    os.write(2, f"thread {t} line {i}\n".encode())
                time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    got = sorted(r.getMessage() for r in caplog.records)
    assert got == sorted(f"faiss: thread {t} line {i}" for t in range(4) for i in range(20))
    assert "thread" not in capfd.readouterr().err
    os.write(2, b"after\n")                              # fd 2 works again
    assert capfd.readouterr().err == "after\n"


def test_forward_levels(caplog):
    caplog.set_level(logging.DEBUG, logger="retrieval.thirdparty")
    assert forward("OMP: Warning #1: x\n\nError in foo\nhello\n", "omp") == 3
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR, logging.INFO]
