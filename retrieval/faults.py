"""Fault injection for tests, to prove that Spark retries give complete, duplicate-free outputs.

A test hook, not a setting: off unless the environment variable ``RETRIEVAL_FAULTS`` is set on the
driver, e.g. ``RETRIEVAL_FAULTS="stage=index,task=1,kind=kill,after_items=500"``. Its fields:
``stage`` (extract | index | search), ``task`` (the shard / task number to hit), ``kind``
(``raise``: the task raises; ``kill``: the Python worker process dies with ``os._exit``, as on an
OOM kill), ``after_items`` (fail once this many items are done, i.e. mid-shard; default 0). The
driver reads it when a stage plans its job (:func:`configured`) and ships it in the job to the
tasks. Only the FIRST attempt of that task fails, and only inside a Spark task (with ``--engine
local`` there is nobody to retry). Run Spark with retries: ``local[N,F]`` locally (the default
master ``local[*,4]``), ``spark.task.maxFailures`` on a cluster.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from retrieval.engine import in_task, task_attempt

log = logging.getLogger(__name__)


ENV = "RETRIEVAL_FAULTS"
STAGES, KINDS = ("extract", "index", "search"), ("raise", "kill")


class InjectedFault(RuntimeError):
    pass


def configured(environ: Mapping[str, str] | None = None) -> dict | None:
    """The fault the environment asks for (``RETRIEVAL_FAULTS``), or None. A malformed value is an
    error naming the variable (a test that meant to inject a fault must not pass without one)."""
    text = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not text:
        return None
    try:
        fields = dict(item.split("=", 1) for item in text.split(","))
        fault = {"stage": fields.pop("stage").strip(), "task": int(fields.pop("task")),
                 "kind": fields.pop("kind", "raise").strip(), "after_items": int(fields.pop("after_items", 0))}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{ENV}={text!r}: expected stage=...,task=N[,kind=raise|kill][,after_items=N] "
                         f"({exc})") from None
    if fields or fault["stage"] not in STAGES or fault["kind"] not in KINDS or fault["after_items"] < 0:
        raise ValueError(f"{ENV}={text!r}: stage must be one of {', '.join(STAGES)}, kind one of "
                         f"{', '.join(KINDS)}, after_items >= 0, and no other fields")
    return fault


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
