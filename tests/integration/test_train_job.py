"""The training job end to end on a tiny real-image set: CLI, checkpoints + cards, resume after an
interruption (to the same weights), refusal to mix settings, and TorchDistributor data parallelism."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from retrieval import cli
from retrieval.config import load
from retrieval.model.checkpoints import load_checkpoint
from retrieval.sample import real_photos
from retrieval.train import trainer

TINY = ["model.checkpoint=", "preprocess.size_hi=64", "preprocess.size_lo=48", "train.batch_size=6", "train.cache_views=3",
        "train.max_side=96", "train.checkpoint_every=2", "train.progress_seconds=5", "train.threads=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("train_photos")
    for p in real_photos("train")[:6]:
        shutil.copy(p, d / os.path.basename(p))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(d)


def _cfg(sets):
    return load(sets=[*TINY, *sets])


def test_cli_train_writes_checkpoints_cards_and_skips_done_stages(photos, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--engine", "local", "--input", photos, "--output", out, *sum(
        (["--set", s] for s in [*TINY, "train.stage1.steps=2", "train.stage2.steps=4",
                                "train.stage3.steps=4", f"train.eval_input={photos}",
                                "train.eval_copies=1"]), [])]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    card = json.load(open(os.path.join(out, "model_card.json")))
    assert card["data"]["images"] == 6 and card["data"]["errors"] == 1   # broken.jpg skipped, counted
    assert set(card["stages"]) == {"1", "2", "3"}
    assert [card["stages"][s]["steps"] for s in "123"] == [2, 4, 4]
    assert all(card["stages"][s]["final_loss"] is not None for s in "123")
    model = load_checkpoint(os.path.join(out, "model.pt"))
    assert model.model_version() == card["model_version"] == result["model_version"]
    assert model.spec.heads == "trained" and model.spec.size_hi == 64
    ev = card["evaluation"]["models"]
    assert set(ev) == {"trained", "start"} and 0.0 <= ev["trained"]["recall@1"] <= 1.0
    assert "query_coarse_cost" in card["evaluation"]
    cost = card["evaluation"]["query_coarse_cost"]
    assert 0 < cost["asym_gflops"] < cost["sym_gflops"] and cost["flops_ratio"] < 1   # R_lo is cheaper
    md = open(os.path.join(out, "model_card.md")).read()
    assert card["model_version"] in md and "| recall@1 |" in md
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    for name in ("stage1-step000002", "stage2-step000004", "stage3-step000004"):
        assert f"{name}.pt" in ckpts and f"{name}.card.json" in ckpts and f"{name}.optim.pt" in ckpts
        assert load_checkpoint(os.path.join(out, "checkpoints", f"{name}.pt")).spec.extra["training"]["step"]
    # a rerun finds every stage complete and writes the same model
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["model_version"] == result["model_version"]


def test_interrupted_run_resumes_to_the_same_weights(photos, tmp_path, monkeypatch):
    sets = ["train.stages=[2]", "train.stage2.steps=4"]
    full = trainer.TrainJob.from_config(photos, str(tmp_path / "full"), _cfg(sets))
    ref = trainer.run_training(full)

    cut = trainer.TrainJob.from_config(photos, str(tmp_path / "cut"), _cfg(sets))
    real = trainer.LOSSES[2]

    def dies_at_step_3(model, job, images, cache, step, idx, d):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(model, job, images, cache, step, idx, d)

    monkeypatch.setitem(trainer.LOSSES, 2, dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training(cut)
    state = json.load(open(tmp_path / "cut" / trainer.STATE))
    assert state["current"]["step"] == 2 and not state["completed"]
    monkeypatch.setitem(trainer.LOSSES, 2, real)
    resumed = trainer.run_training(cut)
    assert resumed["stages"]["2"]["resumed_from"] == 2
    a = load_checkpoint(ref["checkpoint"]).state_dict()
    b = load_checkpoint(resumed["checkpoint"]).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ref_curve = [x[1] for x in ref["stages"]["2"]["loss_curve"]]
    cut_curve = [x[1] for x in resumed["stages"]["2"]["loss_curve"]]
    assert cut_curve == pytest.approx(ref_curve, rel=1e-4)


def test_resume_refuses_a_run_with_other_settings(photos, tmp_path):
    out = str(tmp_path / "run")
    trainer.run_training(trainer.TrainJob.from_config(photos, out, _cfg(["train.stages=[3]",
                                                                         "train.stage3.steps=2"])))
    other = trainer.TrainJob.from_config(photos, out, _cfg(["train.stages=[3]", "train.stage3.steps=2",
                                                            "train.seed=5"]))
    with pytest.raises(trainer.TrainError, match="different settings"):
        trainer.run_training(other)
    fresh = trainer.TrainJob.from_config(photos, out, _cfg(["train.stages=[3]", "train.stage3.steps=2",
                                                            "train.seed=5", "train.resume=false"]))
    assert trainer.run_training(fresh)["stages"]["3"]["steps"] == 2


def test_unusable_input_is_a_clear_cli_error(tmp_path, capsys):
    empty = tmp_path / "imgs"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"nope")
    assert cli.main(["train", "--engine", "local", "--input", str(empty), "--output",
                     str(tmp_path / "o"), *sum((["--set", s] for s in TINY), [])]) == 2
    assert "usable image" in capsys.readouterr().err


def test_torch_distributor_matches_single_process(photos, tmp_path, spark):
    sets = ["train.stages=[1,2]", "train.stage1.steps=2", "train.stage2.steps=2", "train.backbone_blocks=1",
            "train.batch_size=4"]
    single = trainer.run_training(trainer.TrainJob.from_config(photos, str(tmp_path / "one"), _cfg(sets)))
    job = trainer.TrainJob.from_config(photos, str(tmp_path / "two"), _cfg([*sets, "train.processes=2"]))
    dist = trainer.run_distributed(spark, job, processes=2)
    assert dist["schedule"]["processes"] == 2
    for s in ("1", "2"):
        a = [x[1] for x in single["stages"][s]["loss_curve"]]
        b = [x[1] for x in dist["stages"][s]["loss_curve"]]
        assert len(a) == len(b) == 2
        # the same global batches and views: the data-parallel loss is the single-process loss
        assert b == pytest.approx(a, rel=1e-3, abs=1e-4)
    assert load_checkpoint(dist["checkpoint"]).spec.heads == "trained"
