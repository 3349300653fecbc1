"""Configurable fault injection, to prove that Spark retries give complete, duplicate-free outputs.

Config (section ``faults``): ``stage`` (extract | index | search | "" = off), ``task`` (the shard /
task number to hit), ``kind`` (``raise``: the task raises; ``kill``: the Python worker process dies
with ``os._exit``, as on an OOM kill), ``after_items`` (fail once this many items are done, i.e.
mid-shard). Only the FIRST attempt of that task fails, and only inside a Spark task (with
``--engine local`` there is nobody to retry). Run Spark with retries: ``local[N,F]`` locally
(the default master ``local[*,4]``), ``spark.task.maxFailures`` on a cluster.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from retrieval.engine import in_task, task_attempt

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    pass


def maybe_fail(faults: Mapping[str, Any] | None, stage: str, task: int, items_done: int = 0) -> None:
    if not faults or faults.get("stage") != stage or int(faults.get("task", -1)) != task:
        return
    if items_done < int(faults.get("after_items", 0)):
        return
    if not in_task() or task_attempt() > 0:
        return
    log.warning("fault injection: %s task %d attempt 0 after %d items: %s", stage, task, items_done,
                faults.get("kind"))
    if faults.get("kind") == "kill":
        os._exit(137)
    raise InjectedFault(f"injected fault in {stage} task {task} after {items_done} items")
