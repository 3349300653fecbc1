"""``retrieval toy --input NUMBERS.txt --output URL``: each number n of the input file -> a row
(n, factor * n * n), one engine task per number, written as Parquet under the output contract."""
from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import fsio, outputs
from retrieval.engine import in_task
from retrieval.stage import Stage, arg, positive

PART = "part-00000.parquet"


def square(work: tuple[int, int]) -> dict:
    """The task body: the same on both engines."""
    factor, n = work
    return {"n": n, "value": factor * n * n, "in_task": in_task()}


def run(inputs: Mapping[str, Any], output: str | None, cfg: Any, engine: Any) -> dict:
    numbers = [int(x) for x in fsio.read_text(inputs["input"]).split()]
    outputs.configure_and_check_writable(output, cfg["io.storage_options"])
    outputs.begin(output)
    rows = engine.map(square, [(cfg["toy.factor"], n) for n in numbers], label="toy")
    with fsio.atomic_open(fsio.join(output, PART)) as fh:
        pq.write_table(pa.Table.from_pylist(rows), fh)
    return outputs.commit(output, "toy", {"input": inputs["input"], "counts": {"rows": len(rows)},
                                          "files": outputs.file_entries(output, [PART])}, engine=engine, cfg=cfg)


def summary(m: dict, inputs: Mapping[str, Any], output: str | None) -> dict:
    return {"output": output, "rows": m["counts"]["rows"], "engine": m["engine"]}


STAGE = Stage(
    name="toy",
    help="squares of numbers (a test stage)",
    usage="--input FILE --output URL",
    args=(arg("--input", required=True, help="a text file of integers"),
          arg("--output", required=True, help="output URL")),
    run=run,
    summary=summary,
    section="toy",
    defaults={"factor": 2},
    checks={"toy.factor": positive},
)
