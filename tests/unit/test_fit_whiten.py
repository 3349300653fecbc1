"""The whitening and PCA maths of ``retrieval fit`` (retrieval/fit/whiten.py)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from retrieval.fit import whiten


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) * np.linspace(3, 0.05, d)[:, None])
    return (x + 2.0).astype(np.float32)


def test_full_whitening_gives_zero_mean_and_identity_covariance():
    x = _correlated(4000, 16)
    w = whiten.fit_whitening(x, shrinkage=0.0, power=0.5)
    y = x @ w.weight.T + w.bias
    assert np.abs(y.mean(axis=0)).max() < 1e-3
    assert np.allclose(np.cov(y.T, bias=True), np.eye(16), atol=2e-3)
    assert list(w.eigenvalues) == sorted(w.eigenvalues, reverse=True)


def test_power_zero_only_centres_and_rotates():
    x = _correlated(500, 8)
    w = whiten.fit_whitening(x, shrinkage=0.0, power=0.0)
    y = x @ w.weight.T + w.bias
    # a rotation: distances between centred points are kept
    xc = x - x.mean(axis=0)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(xc, axis=1), rtol=1e-4)


def test_shrinkage_keeps_a_fit_from_fewer_vectors_than_dimensions_finite_and_bounded():
    x = _correlated(60, 128, seed=1)           # n < d: the sample covariance is singular
    unreg = whiten.fit_whitening(x, shrinkage=0.0, power=0.5)
    reg = whiten.fit_whitening(x, shrinkage=0.2, power=0.5)
    assert np.isfinite(reg.weight).all()
    # condition number of the whitening bounded by the shrinkage; unregularised it explodes
    cond = lambda w: np.linalg.norm(w.weight, 2) * np.linalg.norm(np.linalg.pinv(w.weight), 2)  # noqa: E731
    assert cond(reg) < 10 < cond(unreg)
    with pytest.raises(ValueError, match="at least 2"):
        whiten.fit_whitening(x[:1], 0.1, 0.5)


def test_pca_projection_spans_the_top_directions_and_pads_when_too_few():
    x = _correlated(2000, 12)
    w, b = whiten.pca_projection(x, 4)
    y = x @ w.T + b
    total = ((x - x.mean(0)) ** 2).sum()
    # the 4 kept directions hold more variance than any other 4 orthonormal directions (e.g. axes)
    axes = np.argsort(-x.var(0))[:4]
    assert (y ** 2).sum() >= ((x - x.mean(0))[:, axes] ** 2).sum() - 1e-3 * total
    assert np.allclose(w @ w.T, np.eye(4), atol=1e-5)
    w8, _ = whiten.pca_projection(x[:, :3], 8)   # 3-d input, 8 outputs: rows 3.. are zero
    assert np.allclose(w8[3:], 0) and np.allclose(w8[:3] @ w8[:3].T, np.eye(3), atol=1e-5)


def test_adapter2_refit_improves_the_held_out_match_and_touches_only_adapter2():
    from retrieval.model.network import ModelSpec, DescriptorModel

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v2", channels=32, fine_dim=16, coarse_dim=8)
    model = DescriptorModel(spec, torch.nn.Identity())
    model.init_heads(0)
    with torch.no_grad():
        for p in model.adapter2.parameters():
            p.add_(0.3 * torch.randn_like(p))           # adapter 2 no longer matches adapter 1
    hi = torch.randn(400, 32)
    lo = hi + 0.1 * torch.randn(400, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    facts = whiten.refit_adapter2(model, hi, lo, steps=200, lr=3e-3, seed=0)
    assert facts["held_out"] == 40 and facts["cosine_after"] > facts["cosine_before"] + 0.05
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("adapter2.") for k in changed)


def test_ledoit_wolf_shrinks_more_for_fewer_vectors():
    x = _correlated(5000, 64, seed=3)
    few, many = whiten.ledoit_wolf_shrinkage(x[:80]), whiten.ledoit_wolf_shrinkage(x)
    assert 0.0 <= many < few <= 1.0 and many < 0.05
    # white data: nothing to estimate beyond the identity -> shrink (almost) fully
    assert whiten.ledoit_wolf_shrinkage(np.random.default_rng(0).standard_normal((100, 64))) > 0.8
    w = whiten.fit_whitening(x[:80], None, 0.5)
    assert w.shrinkage == pytest.approx(few) and w.summary()["shrinkage"] == round(few, 4)


def test_fit_shrinkage_config_takes_auto_or_a_number():
    from retrieval import config

    assert config.load()["fit.shrinkage"] == 0.2
    assert config.load(sets=["fit.shrinkage=auto"])["fit.shrinkage"] == "auto"
    assert config.load(sets=["fit.shrinkage=0.3"])["fit.shrinkage"] == 0.3
    for bad in ("fit.shrinkage=often", "fit.shrinkage=1.5", "fit.shrinkage=true"):
        with pytest.raises(config.ConfigError, match="fit.shrinkage"):
            config.load(sets=[bad])


def test_background_images_join_the_whitening_fit_and_are_spread_as_the_gallery_is():
    """``fit.background``: the whitening is fitted on gallery + background, so the fitted model spreads
    the background as it spreads the gallery (what the false-match estimate assumes); the adapter-2
    re-fit and everything else still see the gallery only."""
    from retrieval.fit.job import fit_model
    from retrieval.model.network import ModelSpec, DescriptorModel

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v2", channels=32, fine_dim=16, coarse_dim=8)
    cfg = {"shrinkage": 0.2, "power": 0.5, "adapter2_steps": 0, "adapter2_lr": 1e-3, "seed": 0,
           "background_share": 0.5}
    gallery = torch.randn(300, 32).abs()
    shift = torch.zeros(32)
    shift[:8] = 2.0
    background = torch.randn(900, 32).abs() + shift          # another kind of image, 3x as many

    def fitted(extra):
        model = DescriptorModel(spec, torch.nn.Identity())
        model.init_heads(0)
        facts = fit_model(model, gallery, gallery, cfg, extra_hi=extra)
        with torch.no_grad():
            pre = [torch.nn.functional.normalize(model.fine_head(x), dim=-1) for x in (gallery, background)]
            out = [model.fine_white(x) for x in pre]             # before the final normalisation
        return facts, out

    def spread(y):       # mean squared distance to the centre, per dimension
        return float(((y - y.mean(0)) ** 2).sum(1).mean()) / y.shape[1]

    _, (g_alone, b_alone) = fitted(None)
    facts, (g_both, b_both) = fitted(background)
    # gallery alone: centred and whitened, the background not (off-centre, another spread)
    assert float(g_alone.mean(0).norm()) < 1e-3 < float(b_alone.mean(0).norm())
    # together, half the weight each: the centre is halfway between the two sets' centres, and
    # gallery and background spread alike
    assert float((g_both.mean(0) + b_both.mean(0)).norm()) < 1e-3
    ratio_alone, ratio_both = spread(b_alone) / spread(g_alone), spread(b_both) / spread(g_both)
    assert abs(np.log(ratio_both)) < abs(np.log(ratio_alone))
    assert facts["fine_whitening"]["dim"] == 16 and facts["adapter2"]["steps"] == 0
    # weighted rows: a weight is a repeat count
    x = _correlated(60, 4)
    w = whiten.fit_whitening(x, 0.0, 0.5, weights=np.r_[np.full(30, 2.0), np.ones(30)])
    r = whiten.fit_whitening(np.concatenate([x[:30], x]), 0.0, 0.5)
    assert np.allclose(np.abs(w.weight), np.abs(r.weight), atol=1e-4) and np.allclose(w.eigenvalues, r.eigenvalues)


def test_a_whitening_layer_gives_back_the_statistics_it_was_fitted_from():
    x = _correlated(400, 12)
    w = whiten.fit_whitening(x, shrinkage=0.1, power=0.5)
    mu, cov = whiten.layer_statistics(w.weight, w.bias)
    c = np.cov(x.T, bias=True)
    c = 0.9 * c + 0.1 * np.trace(c) / 12 * np.eye(12)
    assert np.allclose(mu, x.mean(axis=0), atol=1e-3)
    assert np.allclose(cov, c, rtol=1e-3, atol=1e-4)
    mu0, cov0 = whiten.layer_statistics(np.eye(3), np.zeros(3))          # identity: mean 0, covariance I
    assert np.allclose(mu0, 0) and np.allclose(cov0, np.eye(3))


def test_prior_share_mixes_the_models_own_whitening_into_the_gallery_fit():
    """``fit.prior_share``: the model's shipped whitening (its training images' statistics) joins the
    gallery's with that share: 0 = the gallery alone, near 1 = the model's whitening kept."""
    from retrieval.fit.job import fit_model
    from retrieval.model.network import ModelSpec, DescriptorModel

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v2", channels=32, fine_dim=16, coarse_dim=8)
    train, gallery = torch.randn(2000, 32).abs(), torch.randn(60, 32).abs() * 2 + 1    # another kind of image
    base = DescriptorModel(spec, torch.nn.Identity())
    base.init_heads(0)
    cfg = {"shrinkage": 0.2, "power": 0.5, "adapter2_steps": 0, "adapter2_lr": 1e-3, "seed": 0,
           "background_share": 0.5, "prior_share": 0.0}
    fit_model(base, train, train, cfg)                    # "shipped": whitened on its training images

    def refit(share):
        m = copy.deepcopy(base)
        facts = fit_model(m, gallery, gallery, {**cfg, "prior_share": share})
        return m, facts

    alone, facts0 = refit(0.0)
    kept, facts1 = refit(0.999)
    half, facts5 = refit(0.5)
    w = lambda m: m.fine_white.weight.detach().numpy()   # noqa: E731
    assert np.allclose(np.abs(w(kept)), np.abs(w(base)), atol=0.05 * np.abs(w(base)).max())
    assert not np.allclose(np.abs(w(alone)), np.abs(w(base)), atol=0.05 * np.abs(w(base)).max())
    with torch.no_grad():
        centre = [float(m.fine_white(torch.nn.functional.normalize(m.fine_head(gallery), dim=-1)).mean(0).norm())
                  for m in (alone, half, kept)]
    assert centre[0] < 1e-3 < centre[1] < centre[2]       # the gallery's centre moves back towards the model's
    assert facts0["fine_whitening"]["prior_share"] == 0.0 and facts5["coarse_whitening"]["prior_share"] == 0.5
    # no prior_share in an older config: the gallery alone
    old = {k: v for k, v in cfg.items() if k != "prior_share"}
    m = copy.deepcopy(base)
    fit_model(m, gallery, gallery, old)
    assert np.allclose(w(m), w(alone))
