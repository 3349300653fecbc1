"""The model inside a task (``retrieval.model.task``): built once per process, its model_version hashed
once, and still checked against the driver's at every task."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from retrieval import config
from retrieval.model import task
from retrieval.model.network import DescriptorModel


def _job(version: str) -> SimpleNamespace:
    cfg = config.load(sets=["model.runtime=torch"])
    return SimpleNamespace(model_cfg=cfg["model"].to_dict(), preprocess_cfg=cfg["preprocess"].to_dict(),
                           model_version=version, threads=1, storage_options=None)


def test_the_version_is_hashed_once_per_process_and_checked_every_task(monkeypatch):
    built = task.get_model(_job("").model_cfg, _job("").preprocess_cfg, "cpu")
    version = built.model_version()
    calls = []
    real = DescriptorModel.model_version
    monkeypatch.setattr(DescriptorModel, "model_version", lambda self: calls.append(1) or real(self))
    for _ in range(3):
        model, device = task.task_model(_job(version), "cpu")
        assert model is built and device == "cpu"
    assert calls == []          # the version hashed when the model was built is reused
    with pytest.raises(RuntimeError, match="weights differ between machines"):
        task.task_model(_job("0" * 16), "cpu")
    assert task.built_version(built) == version
