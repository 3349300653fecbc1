"""The three stages: exactly the intended parameters move, the losses fall on real photos, and the
loss functions, schedule and batch sampling behave."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval.config import load
from retrieval.model.network import build_model
from retrieval.extract.preprocess import DecodePolicy
from retrieval.sample import real_photos
from retrieval.train import trainer
from retrieval.train.data import decode_all
from retrieval.train.dist import Dist

SIZES = {"model.checkpoint": "", "preprocess.size_hi": 64, "preprocess.size_lo": 48}



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def images():
    rows = []
    for p in real_photos("train")[:8]:
        with open(p, "rb") as fh:
            rows.append((p.rsplit("/", 1)[-1], p, fh.read(), None))
    return decode_all(rows, DecodePolicy(), max_side=128, source="real_photos(train)[:8]")


def _job(tmp_path, **train) -> trainer.TrainJob:
    sets = {**SIZES, "train.batch_size": 8, "train.cache_views": 4, "train.seed": 0, **train}
    cfg = load(overrides=sets)
    return trainer.TrainJob.from_config("unused", str(tmp_path), cfg)


def _model():
    return build_model(size_hi=64, size_lo=48)


EXPECTED = {
    1: lambda n: n.startswith(("backbone.17.", "backbone.18.")) or n == "pool.p",
    2: lambda n: n.startswith(("adapter1.", "fine_head.")),
    3: lambda n: n.startswith("adapter2."),
}


@pytest.mark.parametrize("stage,cached", [(1, False), (1, True), (2, True), (3, True)])
def test_each_stage_updates_exactly_its_parameters(tmp_path, images, stage, cached):
    job = _job(tmp_path, **{"train.backbone_blocks": 2})
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = trainer.build_cache(model, images, job, Dist(), blocks=2 if stage == 1 else 0) if cached else None
    state: dict = {"completed": {}, "losses": {}}
    job = trainer.TrainJob(**{**job.__dict__, "train_cfg": {**job.train_cfg, f"stage{stage}":
                                                            {"steps": 2, "lr": 1e-3}}})
    trainer.run_stage(model, job, images, stage, state, Dist(), cache)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k, _ in model.named_parameters() if EXPECTED[stage](k)}
    assert changed == expected
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after the stage


def test_pooled_cache_from_prefix_matches_direct_encoding(tmp_path, images):
    job = _job(tmp_path)
    model = _model()
    direct = trainer.build_cache(model, images, job, Dist())
    derived = trainer.pooled_cache(model, trainer.build_cache(model, images, job, Dist(), blocks=2))
    assert derived.hi.shape == direct.hi.shape == (len(images), 4, 1280)
    assert torch.allclose(derived.hi.float(), direct.hi.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(derived.lo.float(), direct.lo.float(), rtol=2e-2, atol=2e-2)


def test_stage2_without_fine_head_leaves_it_alone(tmp_path, images):
    job = _job(tmp_path, **{"train.fine_head": False})
    names = trainer.trainable_names(_model(), 2, fine_head=False)
    assert names == ["adapter1.weight", "adapter1.bias"]
    assert len(trainer.trainable_names(_model(), 1, backbone_blocks=0)) == \
        sum(1 for n, _ in _model().named_parameters() if n.startswith("backbone.")) + 1
    assert job.train_cfg["fine_head"] is False


def _losses(model, job, images, stage, steps, cache=None):
    names = trainer.trainable_names(model, stage, int(job.train_cfg["backbone_blocks"]), True)
    params = trainer.set_trainable(model, names)
    opt = torch.optim.AdamW(params, lr=job.stage_cfg(stage)["lr"])
    out = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        # the same batch every step: the loss on it must fall
        loss = trainer.LOSSES[stage](model, job, images, cache, 1, list(range(len(images))), Dist())
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_losses_decrease_in_a_few_steps(tmp_path, images):
    job = _job(tmp_path, **{"train.stage1.lr": 1e-3, "train.stage2.lr": 3e-3, "train.stage3.lr": 1e-3,
                            "train.augment_strength": 0.6})
    model = _model()
    l1 = _losses(model, job, images, 1, 4)
    assert l1[-1] < l1[0], l1
    prefix = trainer.build_cache(_model(), images, job, Dist(), blocks=2)
    l1c = _losses(_model(), job, images, 1, 4, prefix)   # stage 1 on cached frozen-prefix activations
    assert l1c[-1] < l1c[0], l1c
    cache = trainer.build_cache(model, images, job, Dist())
    l2 = _losses(model, job, images, 2, 6, cache)
    assert l2[-1] < 0.8 * l2[0], l2
    l3 = _losses(model, job, images, 3, 6, cache)
    assert l3[-1] < l3[0], l3
    # the same stages without the cache (fresh views every step) also learn
    model2 = _model()
    l2b = _losses(model2, job, images, 2, 5, None)
    assert l2b[-1] < l2b[0], l2b


def test_info_nce_and_distillation_definitions():
    torch.manual_seed(0)
    a = torch.randn(6, 16)
    assert trainer.info_nce(a, a.clone(), 0.05).item() < 1e-3    # perfect positives
    p = torch.randn(6, 16)
    an, pn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    logits = an @ pn.T / 0.1
    manual = -torch.log(torch.exp(logits.diag()) / torch.exp(logits).sum(1)).mean()
    assert trainer.info_nce(a, p, 0.1).item() == pytest.approx(manual.item(), rel=1e-5)
    s = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert trainer.distill_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert trainer.distill_loss(s, -s).item() == pytest.approx(2.0, abs=1e-6)


def test_lr_schedule_and_batches():
    lrs = [trainer.lr_at(s, 100, 1.0) for s in range(1, 101)]
    assert lrs[4] == pytest.approx(1.0) and lrs[0] < lrs[4]
    assert lrs[-1] == pytest.approx(0.05, abs=1e-3) and all(x > 0 for x in lrs)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    b1 = trainer.batch_indices(0, 2, 7, 30, 8)
    assert len(set(b1.tolist())) == 8 and np.array_equal(b1, trainer.batch_indices(0, 2, 7, 30, 8))
    assert not np.array_equal(b1, trainer.batch_indices(0, 2, 8, 30, 8))
    assert not math.isnan(lrs[50])


def test_too_few_images_is_a_clear_error(tmp_path, images):
    from retrieval.train.data import ImageSet

    one = ImageSet(images.ids[:1], images.images[:1])
    job = _job(tmp_path)
    with pytest.raises(trainer.TrainError, match="at least 2 images"):
        trainer.run_stage(_model(), job, one, 2, {"completed": {}, "losses": {}}, Dist(), None)


def test_koleo_and_similarity_distillation_definitions():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    nn_dist = torch.cdist(z, z) + torch.eye(8) * 9
    manual = -torch.log(nn_dist.min(dim=1).values).mean()
    assert trainer.koleo_loss(z).item() == pytest.approx(manual.item(), rel=1e-4)
    # spreading the rows lowers it: a batch with two near-copies scores higher than a spread one
    crowded = z.clone()
    crowded[1] = z[0] + 1e-3 * torch.randn(16)
    assert trainer.koleo_loss(crowded).item() > trainer.koleo_loss(z).item()
    # the same similarity structure (any rotation, any dimension) is a zero loss; another one is not
    rot, _ = torch.linalg.qr(torch.randn(16, 16))
    padded = torch.cat([z @ rot, torch.zeros(8, 5)], dim=1)
    assert trainer.similarity_distill_loss(z, padded, 0.05).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(8, 12)
    assert trainer.similarity_distill_loss(z, other, 0.05).item() > 0.1
    # the teacher gets no gradient, the student does
    s, t = z.clone().requires_grad_(True), other.clone().requires_grad_(True)
    trainer.similarity_distill_loss(s, t, 0.05).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("cached", [False, True])
def test_stage1_with_a_teacher_learns_its_similarity_structure(tmp_path, images, cached):
    """A TorchScript teacher (another network: a different similarity structure): stage 1 with
    ``train.teacher`` lowers the distillation loss; the teacher's embeddings are cached per view."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    url = str(tmp_path / "teacher.torchscript.pt")
    torch.jit.save(torch.jit.trace(net.eval(), torch.rand(2, 3, 48, 48)), url)
    job = _job(tmp_path / "run", **{"train.teacher": url, "train.teacher_size": 48, "train.teacher_weight": 1.0,
                                    "train.koleo": 0.1, "train.stage1.lr": 1e-3, "train.backbone_blocks": 2})
    teacher = trainer.load_teacher(url, 48, job.preprocess_cfg)
    model = _model()
    cache = trainer.build_cache(model, images, job, Dist(), blocks=2, teacher=teacher) if cached else None
    if cached:
        assert cache.teacher is not None and cache.teacher.shape[:2] == (len(images), 4)
        again = trainer.build_cache(model, images, job, Dist(), blocks=2, teacher=teacher)   # from disk
        assert torch.equal(again.teacher, cache.teacher) and torch.equal(again.hi, cache.hi)

    def distill_now() -> float:
        with torch.no_grad():
            x = torch.stack([torch.nn.functional.interpolate(
                torch.from_numpy(np.asarray(im.resize((64, 64)))).permute(2, 0, 1)[None].float() / 255, size=64)[0]
                for im in images.images])
            t_emb = teacher.embed(torch.nn.functional.interpolate(x, size=48))
            return trainer.similarity_distill_loss(model.fine(model.pooled(x)), t_emb, 0.05).item()

    before = distill_now()
    state: dict = {"completed": {}, "losses": {}}
    job = trainer.TrainJob(**{**job.__dict__, "train_cfg": {**job.train_cfg, "stage1": {"steps": 8, "lr": 3e-3},
                                                            "temperature": 0.5}})
    trainer.run_stage(model, job, images, 1, state, Dist(), cache, None if cached else teacher)
    assert distill_now() < before
