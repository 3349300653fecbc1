"""The extraction's summary names the failed files (issue 22, item 6): the CLI's summary (stdout
JSON and the log) lists the first few failed images with their error, and the count; real
extraction (local engine) over the image zoo, whose broken files fail for known reasons."""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import config, fsio
from retrieval.engine import LOCAL
from retrieval.extract.job import extract
from retrieval.extract.stage import ERROR_EXAMPLES, summary as cli_summary
from tests.imagezoo import EXPECTED, make_zoo


def test_summary_lists_the_first_failed_files_and_the_count(tmp_path, caplog):
    make_zoo(str(tmp_path / "zoo"))
    out = str(tmp_path / "out")
    cfg = config.load(sets=["extract.num_shards=2", "extract.batch_size=8", "extract.progress_seconds=60"])
    caplog.set_level(logging.WARNING, logger="retrieval.extract.stage")
    inputs = {"input": str(tmp_path / "zoo")}
    summary = cli_summary(extract(inputs["input"], out, cfg, LOCAL), inputs, out)
    n_failed = sum(1 for v in EXPECTED.values() if v != "ok")
    assert n_failed > ERROR_EXAMPLES            # the zoo has more failures than the summary names
    failed = summary["failed"]
    assert failed["count"] == summary["counts"]["errors"] == n_failed
    assert failed["all_in"] == fsio.join(out, "errors")
    # the same files and errors as the error files, in shard order
    files = sorted(fsio.url_to_fs(out)[0].glob(out + "/errors/*.parquet"))
    rows = pa.concat_tables([pq.read_table(p) for p in files])
    expected = [{"file": u, "error": e} for u, e in zip(rows["uri"].to_pylist(), rows["error"].to_pylist())]
    assert failed["first"] == expected[:ERROR_EXAMPLES]
    assert all(EXPECTED[fsio.strip_protocol(f["file"])[len(str(tmp_path / "zoo")) + 1:]] != "ok"
               for f in failed["first"])
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"extract: {n_failed} of {len(EXPECTED)} images failed (all listed in {out}/errors/")
    assert lines[1:] == [f"extract: failed: {e['file']}: {' '.join(e['error'].split())}" for e in expected[:ERROR_EXAMPLES]]
