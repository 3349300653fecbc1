"""Reading an image's bytes (``retrieval.extract.inputs``): the max_bytes cap, without allocating it."""
from __future__ import annotations

import io
import tracemalloc

from retrieval.extract.inputs import _read_capped, _read_file, read_items

CAP = 64 * 1024 * 1024


def test_a_file_is_read_whole_and_the_cap_is_not_allocated(tmp_path):
    f = tmp_path / "a.jpg"
    payload = bytes(range(256)) * 40          # 10 KB
    f.write_bytes(payload)
    tracemalloc.start()
    try:
        data, err = _read_file(str(f), CAP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (data, err) == (payload, None)
    assert peak < 4 * 1024 * 1024, f"reading 10 KB allocated {peak} bytes (the {CAP}-byte cap?)"


def test_the_cap_holds_at_its_edges(tmp_path):
    for n, ok in ((100, True), (101, False), (0, True)):
        f = tmp_path / f"f{n}.bin"
        f.write_bytes(b"x" * n)
        data, err = _read_file(str(f), 100)
        if ok:
            assert (data, err) == (b"x" * n, None)
        else:
            assert data is None and err == "file too large: > max_bytes 100"


class _Grown(io.BytesIO):
    """A file whose recorded size is smaller than what it holds (it grew after being listed)."""
    size = 10


def test_a_file_larger_than_its_size_is_read_on_up_to_the_cap():
    assert _read_capped(_Grown(b"y" * 50), 100) == b"y" * 50
    assert len(_read_capped(_Grown(b"y" * 500), 100)) == 101      # over the cap: the caller refuses it
    assert _read_capped(io.BytesIO(b"z" * 30), 100) == b"z" * 30  # no size attribute: one capped read


def test_read_items_from_fsspec_memory_and_local(tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.pipe("/bigjpeg-read/a.bin", b"m" * 1000)
    (tmp_path / "b.bin").write_bytes(b"l" * 2000)
    rows = [("a", "memory:///bigjpeg-read/a.bin"), ("b", str(tmp_path / "b.bin")),
            ("c", str(tmp_path / "missing.bin"))]
    got = list(read_items(rows, 1500))
    assert got[0] == ("a", "memory:///bigjpeg-read/a.bin", b"m" * 1000, None)
    assert got[1] == ("b", str(tmp_path / "b.bin"), None, "file too large: > max_bytes 1500")
    assert got[2][2] is None and got[2][3] == "missing file: not found"
    mem.rm("/bigjpeg-read", recursive=True)


def test_local_paths_read_with_the_same_errors_as_fsspec(tmp_path):
    """A local path is opened with the built-in open (fsspec's resolution of each URL is skipped); its
    error rows are the ones fsspec's path gives."""
    d = tmp_path / "sub"
    d.mkdir()
    (d / "ok.bin").write_bytes(b"k" * 10)
    for uri in (str(d / "ok.bin"), "file://" + str(d / "ok.bin")):
        assert _read_file(uri, 100) == (b"k" * 10, None)
    for uri in (str(d), "file://" + str(d)):
        assert _read_file(uri, 100) == (None, "unreadable uri: is a directory")
    for uri in (str(d / "no.bin"), "file://" + str(d / "no.bin")):
        assert _read_file(uri, 100) == (None, "missing file: not found")
