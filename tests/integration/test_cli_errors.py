"""One-line errors (issue 22, item 6): a stage that cannot reach its storage or is given another
stage's output ends in ONE clear line, ``retrieval <stage>: error: ...``, and exit code 2, never a
traceback. Real runs of the CLI in subprocesses (a user's shell), against a real S3-compatible
server (moto: one that accepts any key, one that checks keys), a closed port and a real marker of
another stage."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(tmp_path, **extra: str) -> dict:
    """No credentials anywhere: no AWS_* variables, no ~/.aws, no instance metadata lookups."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=ROOT,
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    env.update(extra)
    return env


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retrieval.cli", *args, "--engine", "local"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, stage: str) -> str:
    """The single error line (asserts exit code 2, no traceback, nothing else on stderr but log lines)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"retrieval {stage}: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    others = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln not in lines
              and " INFO retrieval" not in ln]
    assert not others, others
    return lines[0]


def _storage(endpoint: str, fast: bool = False) -> str:
    opts = f'endpoint_url: "{endpoint}"'
    if fast:   # one connection attempt of at most 1 s: the test does not wait for botocore's retries
        opts += ", config_kwargs: {connect_timeout: 1, retries: {max_attempts: 1}}"
    return f"io.storage_options={{s3: {{{opts}}}}}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strict_s3():
    """A moto server that checks access keys (INITIAL_NO_AUTH_ACTION_COUNT=0), in its own process."""
    port = _free_port()
    code = ("import time\nfrom moto.server import ThreadedMotoServer\n"
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}); s.start()\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_s3_input_without_credentials(s3, tmp_path):
    proc = _cli(_env(tmp_path), "extract", "--input", f"{s3['bucket']}/in", "--output", str(tmp_path / "out"),
                "--set", _storage(s3["endpoint"]))
    line = _one_line_error(proc, "extract")
    assert f"{s3['bucket']}/in: no S3 credentials found" in line and "AWS_ACCESS_KEY_ID" in line


def test_s3_output_without_credentials(s3, tmp_path):
    (tmp_path / "in").mkdir()
    proc = _cli(_env(tmp_path), "index", "--features", str(tmp_path / "in"), "--output",
                f"{s3['bucket']}/idx", "--set", _storage(s3["endpoint"]))
    line = _one_line_error(proc, "index")
    assert "no S3 credentials found" in line, line


def test_s3_wrong_credentials(strict_s3, tmp_path):
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="wrong", AWS_SECRET_ACCESS_KEY="wrong", AWS_DEFAULT_REGION="us-east-1")
    proc = _cli(env, "extract", "--input", "s3://some-bucket/in", "--output", str(tmp_path / "out"),
                "--set", _storage(strict_s3))
    line = _one_line_error(proc, "extract")
    assert "s3://some-bucket/in: S3 refused the request" in line and "credentials" in line, line
    proc = _cli(env, "extract", "--input", str(tmp_path), "--output", "s3://some-bucket/out",
                "--set", _storage(strict_s3))
    line = _one_line_error(proc, "extract")
    assert "InvalidAccessKeyId" in line and "not writable" in line, line


def test_s3_bucket_that_does_not_exist(s3, tmp_path):
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc = _cli(env, "extract", "--input", "s3://no-such-bucket-here/in", "--output", str(tmp_path / "out"),
                "--set", _storage(s3["endpoint"]))
    assert "input not found: s3://no-such-bucket-here/in" in _one_line_error(proc, "extract")


def test_unreachable_endpoint_and_url(tmp_path):
    port = _free_port()      # nothing listens there
    env = _env(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    t0 = time.monotonic()
    proc = _cli(env, "index", "--features", "s3://bucket/features", "--output", str(tmp_path / "idx"),
                "--set", _storage(f"http://127.0.0.1:{port}", fast=True))
    line = _one_line_error(proc, "index")
    assert "s3://bucket/features/_manifest.json: cannot reach the storage endpoint" in line, line
    assert str(port) in line and time.monotonic() - t0 < 60
    proc = _cli(env, "index", "--features", f"http://127.0.0.1:{port}/features", "--output", str(tmp_path / "i"))
    line = _one_line_error(proc, "index")
    assert f"http://127.0.0.1:{port}/features/_manifest.json: cannot reach the server" in line, line


def test_wrong_stage_input(tmp_path):
    from retrieval import outputs

    search_out = str(tmp_path / "search")
    outputs.commit(search_out, "search", {"counts": {"queries": 0}})     # a (real) search output's marker
    proc = _cli(_env(tmp_path), "index", "--features", search_out, "--output", str(tmp_path / "idx"))
    line = _one_line_error(proc, "index")
    assert "stage is 'search', expected 'extract'" in line, line
