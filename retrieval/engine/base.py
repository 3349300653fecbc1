"""The engine interface (:class:`Engine`), the plans' shared pieces (:class:`Step`, :class:`Shared`)
and the task errors the driver re-raises as themselves (:func:`task_error`, :func:`translate`).
The two implementations: :mod:`retrieval.engine.local` and :mod:`retrieval.engine.spark`."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Sequence

# class name -> class, of the errors a task raises that the driver re-raises as themselves
TASK_ERRORS: dict[str, type[Exception]] = {}


def task_error(cls: type[Exception]) -> type[Exception]:
    """Class decorator: this error's message is clear, so a Spark task's instance is re-raised on
    the driver as the same class and message (:meth:`Engine.run`)."""
    TASK_ERRORS[cls.__name__] = cls
    return cls


def translate(exc: BaseException) -> BaseException | None:
    """The registered task error that ``exc`` (a Spark failure's Java/Python trace) carries, or None."""
    if type(exc).__name__ in TASK_ERRORS or not TASK_ERRORS:
        return None
    names = "|".join(sorted(map(re.escape, TASK_ERRORS), key=len, reverse=True))
    m = re.search(rf"\b({names}): ([^\n]+)", str(exc))
    return TASK_ERRORS[m.group(1)](m.group(2)) if m else None


def key_slices(table: Any, key: str) -> list:
    """``table`` (a ``pyarrow.Table``) split by its column ``key``: one slice per value, values in
    sorted order, each value's rows in their order (:meth:`Engine.map_arrow` on both engines)."""
    if not table.num_rows:
        return []
    table = table.sort_by(key)          # stable: a value's rows keep their order
    values = table.column(key).to_numpy(zero_copy_only=False)
    bounds = [0, *(i for i in range(1, len(values)) if values[i] != values[i - 1]), len(values)]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


class Shared:
    """A broadcast value: ``.value`` in every task, ``destroy()`` when the stage is done."""

    def __init__(self, value: Any, handle: Any = None) -> None:
        self._value, self._handle = value, handle

    @property
    def value(self) -> Any:
        return self._handle.value if self._handle is not None else self._value

    def __getstate__(self) -> dict:        # a Spark broadcast travels as its handle, not its bytes
        return {"_value": None if self._handle is not None else self._value, "_handle": self._handle}

    def destroy(self) -> None:
        if self._handle is not None:
            self._handle.destroy()


@dataclass(frozen=True)
class Step:
    """One step of :meth:`Engine.run_steps`. The first step runs ``fn(item)`` once per item; each
    later one runs ``fn(key, values)`` once per key in ``range(parts)``, over the values of the
    ``(key, value)`` records the step before it yielded (a shuffle by key). A step yields
    ``(key, value)`` records for the next step, the last one its results.

    ``combine(a, b)``: the values of one key MAY be merged pairwise before ``fn`` sees them (the
    local engine folds each value into its key's as it arrives, so one value per key is held; Spark
    ships them as they are): ``fn`` must give the same result either way. ``progress``/``unit``:
    the local engine's progress line for the step (None: none; Spark has one for the whole plan)."""
    fn: Callable[..., Iterable]
    parts: int = 0
    progress: str | None = None
    unit: str = "tasks"
    combine: Callable[[Any, Any], Any] | None = None


class Engine:
    """What a stage needs from where it runs (see :mod:`retrieval.engine`)."""

    name: ClassVar[str] = "engine"
    is_spark: ClassVar[bool] = False
    spark: Any = None

    @property
    def parallelism(self) -> int:
        raise NotImplementedError

    @property
    def tasks_on_this_machine(self) -> bool:
        """The tasks run on the driver's machine and see its local files (a cluster's do not)."""
        return True

    @property
    def session(self) -> str | None:
        """The session the work runs in (Spark: its application id; None in this process): the
        manifests record it, so the stages of one ``retrieval run`` show that they shared one."""
        return None

    def map(self, fn: Callable, items: Sequence, label: str, every: float = 10.0, threads: int = 1) -> list:
        """``fn`` over ``items``, one task each; the results in item order."""
        raise NotImplementedError

    def map_reduce(self, fn: Callable, items: Sequence, merge: Callable, label: str, every: float = 10.0) -> Any:
        """``fn`` over ``items``, one task each; the results merged pairwise with ``merge``."""
        raise NotImplementedError

    def map_batches(self, fn: Callable[[Iterable], Iterable], items: Sequence, parts: int, label: str,
                    every: float = 10.0) -> list:
        """``items`` in ``parts`` contiguous batches; ``fn(batch)`` yields results, all returned."""
        raise NotImplementedError

    def run_steps(self, label: str, items: Sequence, steps: Sequence[Step], every: float = 10.0) -> list:
        """A keyed plan (:class:`Step`): one task per item, then per step a shuffle of the records by
        key and one task per key; the last step's results (in key order locally, partition order
        on Spark)."""
        raise NotImplementedError

    def map_arrow(self, fn: Callable[[Iterable], Iterable], table: Any, key: str, schema: Any, label: str,
                  every: float = 10.0) -> Any:
        """One task per distinct value of ``table``'s column ``key`` (a ``pyarrow.Table``):
        ``fn(batches)`` gets that value's rows as record batches and yields record batches of
        ``schema``; all of them, as one table."""
        raise NotImplementedError

    def find_duplicates(self, fn: Callable[[Any], Any], items: Sequence, key: str, schema: Any, label: str,
                        rows: int = 0, every: float = 10.0) -> Any:
        """``fn(item)`` is a table of ``schema`` per item (read in a task); the rows of all of them
        whose ``key`` occurs more than once, in no particular order. ``rows``: their expected total,
        to size a shuffle."""
        raise NotImplementedError

    def connected_components(self, fn: Callable[[Any], Any], items: Sequence, schema: Any, label: str,
                             every: float = 10.0) -> Any:
        """The connected components of the undirected graph whose edges are the rows ``(src, dst)``
        of ``fn(item)`` for every item (tables of ``schema``, read in tasks; node ids of one
        orderable type: integers or strings; a self-loop ``(v, v)`` declares an isolated node):
        a table ``(node, component)``, one row per node, ``component`` the smallest node of its
        component (so the labels do not depend on the engine), in no particular order."""
        raise NotImplementedError

    def graph_groups(self, fn: Callable[[Any], Any], items: Sequence, schema: Any,
                     write: Callable[[str, int, Any], str], label: str, largest: int,
                     every: float = 10.0) -> dict | None:
        """The near-duplicate groups of the scored pairs ``fn(item)`` (tables of ``schema``: ``query_id,
        gallery_id, query_uri, gallery_uri, score, norm_score``, read in tasks), made and written
        without bringing the pairs to the driver: ``groups`` and ``edges`` sorted, written in parts by
        ``write(name, part, table) -> file`` in tasks; returns ``{"pairs_kept", "edges", "sizes"
        (size -> groups), "largest" (the groups with ``group_id < largest``), "files"}``. None: the
        engine has no distributed path (the local engine), the caller groups in memory."""
        return None

    def map_matched(self, fn: Callable[[Any, Any], Any], items: Sequence, keys: Callable[[Any], Any],
                    lookup: Callable[[Any], Any], tables: Sequence, schema: Any, label: str,
                    every: float = 10.0) -> dict[int, Any]:
        """A join of each item's keys with a lookup table, then a task per item: ``keys(item)`` is a
        one-column table of the item's keys; the lookup is the rows of ``lookup(t)`` for every ``t``
        in ``tables`` (tables of ``schema``, its first column the key), read in tasks. ``fn(item,
        rows)`` (a JSON-able result) runs in a task for each item one of whose keys the lookup holds, ``rows`` its matching
        lookup rows; returns ``{item's index: fn's result}``. Spark joins the two
        sides without bringing them to the driver; the local engine holds the lookup in memory."""
        raise NotImplementedError

    def broadcast(self, value: Any) -> Shared:
        """A read-only value every task sees (:class:`Shared`)."""
        return Shared(value)

    def run(self, label: str, total: int, action: Callable[[], Any], every: float = 10.0) -> Any:
        """``action()`` under the engine's progress lines (``total`` tasks) and error translation."""
        return action()

    def progress(self, label: str, total: int | None, unit: str, every: float = 10.0) -> ContextManager:
        """A stage's one bar (or log lines) in ``unit`` (images, vectors) for work done in this
        process: the local engine's; the progress of the stage's parts (a shard's
        :class:`~retrieval.progress.Progress` in the same unit) counts into it. On Spark a context
        that does nothing: the driver shows the tasks of each action (:meth:`run`)."""
        return contextlib.nullcontext()

    def run_torch(self, fn: Callable, processes: int, arg: Any, local_mode: bool = True,
                  use_gpu: bool = False) -> Any:
        """Data-parallel torch training: ``fn(arg)`` in ``processes`` processes."""
        raise NotImplementedError
