"""``retrieval fit`` end to end on the sample's real photos: the checkpoint it writes is what later
stages load with ``model.checkpoint``; both engines fit the same model; bad input is refused."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from retrieval import fsio
from retrieval.cli import main
from retrieval.extract.job import read_features
from retrieval.model.checkpoints import load_checkpoint
from retrieval.schema import coarse_matrix, fine_matrix

FAST = ["--set", "fit.adapter2_steps=60", "--set", "extract.num_shards=2"]


@pytest.fixture(scope="module")
def fitted(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    url = str(root / "model.pt")
    assert main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", url, *FAST]) == 0
    return {"root": root, "url": url, "card": json.loads(fsio.read_text(url + ".card.json"))}


def test_fit_writes_a_checkpoint_that_later_stages_load(sample, fitted):
    from retrieval.model.delta import load_delta

    card, url = fitted["card"], fitted["url"]
    model = load_checkpoint(url)
    default = load_delta()
    assert card["model_version"] == model.model_version() != default.model_version()
    assert card["base_model_version"] == default.model_version()
    assert card["images_used"] == len(os.listdir(sample["gallery"])) and card["image_errors"] == 0
    assert model.spec.whiten and model.spec.fine_dim == 512 and model.spec.coarse_dim == 128
    assert model.spec.extra["fit"]["sample_sha256"] == card["sample_sha256"]
    assert "Fitted by `retrieval fit`" in fsio.read_text(url + ".card.md")
    # fit.prior_share (default 0.5): the shipped model's own whitening joins the gallery's statistics
    assert card["facts"]["fine_whitening"]["prior_share"] == card["facts"]["coarse_whitening"]["prior_share"] == 0.5
    assert "carrying 50% of the weight (fit.prior_share)" in fsio.read_text(url + ".card.md")
    # the backbone and the heads before whitening are the shipped model's: only the fit's layers and
    # adapter 2 (re-distilled) differ
    sd, base = model.state_dict(), default.state_dict()
    changed = {k.split(".")[0] for k in sd if k not in base or not torch.equal(sd[k], base[k])}
    assert changed <= {"fine_white", "coarse_white", "adapter2"} and {"fine_white", "coarse_white"} <= changed
    # extraction with model.checkpoint = exactly the URL given to fit
    out = str(fitted["root"] / "features")
    assert main(["extract", "--engine", "local", "--input", sample["gallery"], "--output", out, "--role", "gallery",
                 "--set", f"model.checkpoint={url}", *FAST]) == 0
    t = read_features(out)
    assert set(t.column("model_version").to_pylist()) == {card["model_version"]}
    fine, coarse = fine_matrix(t), coarse_matrix(t)
    assert fine.shape == (t.num_rows, 512) and coarse.shape == (t.num_rows, 128)
    assert np.allclose(np.linalg.norm(fine, axis=1), 1, atol=0.02)
    # centred: the fitted gallery descriptors no longer share one dominant direction (with the default
    # fit.prior_share 0.5 the centre is the mean of the gallery's and the training images': about
    # half the shared direction goes; prior_share 0 removes it all, tests/unit/test_fit_whiten.py)
    base_out = str(fitted["root"] / "features_default")
    assert main(["extract", "--engine", "local", "--input", sample["gallery"], "--output", base_out,
                 "--role", "gallery", *FAST]) == 0
    base_fine = fine_matrix(read_features(base_out))
    assert np.linalg.norm(fine.mean(0)) < 0.7 * np.linalg.norm(base_fine.mean(0))
    # queries: the re-fitted adapter 2 maps the low-resolution copy near the gallery's coarse code
    assert card["facts"]["adapter2"]["cosine_after"] >= card["facts"]["adapter2"]["cosine_before"]


def test_spark_and_local_fit_the_same_model(sample, fitted, spark, tmp_path):
    from retrieval import config
    from retrieval.fit.job import fit

    url = str(tmp_path / "spark.pt")
    card = fit(sample["gallery"], url, config.load(sets=["fit.adapter2_steps=60"]), engine=spark)
    assert card["engine"] == "spark" and card["images_used"] == fitted["card"]["images_used"]
    a, b = load_checkpoint(fitted["url"]), load_checkpoint(url)
    x = torch.randn(64, a.spec.channels).abs()
    with torch.no_grad():
        fa, fb = a.fine(x), b.fine(x)
    # the same similarities (eigenvectors may differ in sign: compare the geometry, not coordinates)
    assert torch.allclose(fa @ fa.T, fb @ fb.T, atol=2e-2)


def test_fit_of_untrained_heads_starts_adapter1_from_the_principal_components(sample, tmp_path):
    url = str(tmp_path / "seeded.pt")
    assert main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", url,
                 "--set", "model.checkpoint=null", *FAST]) == 0
    card = json.loads(fsio.read_text(url + ".card.json"))
    assert card["base_heads"] == "seed:0" and card["facts"]["heads_initialised"] == "pca"
    m = load_checkpoint(url)
    w = m.adapter1.weight.detach().numpy()
    assert np.allclose(w @ w.T, np.eye(128), atol=1e-3)          # orthonormal principal directions


def test_fit_refuses_bad_input_before_any_work(sample, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "m.pt")
    assert main(["fit", "--engine", "local", "--input", str(empty), "--output", out]) == 2
    assert "holds no images" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(os.listdir(sample["gallery"]))[:5]:
        shutil.copy(os.path.join(sample["gallery"], f), few / f)
    assert main(["fit", "--engine", "local", "--input", str(few), "--output", out]) == 2
    assert "at least 20" in capsys.readouterr().err
    assert main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", str(tmp_path / "m.npz")]) == 2
    assert not os.path.exists(out) and not os.path.exists(str(tmp_path / "m.npz"))
    assert main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", out,
                 "--set", "fit.shrinkage=2"]) == 2


def test_fit_with_a_background_whitens_with_it_on_both_engines(sample, fitted, spark, tmp_path):
    """``fit.background``: its images join the gallery in the whitening (the card says how many); the
    fitted model differs from the gallery-only fit, and both engines fit the same one."""
    from retrieval import config
    from retrieval.fit.job import fit

    n_bg = len([f for f in os.listdir(sample["background"]) if not f.startswith(".")])
    sets = ["fit.adapter2_steps=60", f"fit.background={sample['background']}"]
    local = str(tmp_path / "local.pt")
    assert main(["fit", "--engine", "local", "--input", sample["gallery"], "--output", local,
                 *[x for s in sets for x in ("--set", s)]]) == 0
    card = json.loads(fsio.read_text(local + ".card.json"))
    assert card["facts"]["background"] == {"url": sample["background"], "images_listed": n_bg, "images_used": n_bg,
                                           "share": 0.5}
    assert f"together with {n_bg:,} background images" in fsio.read_text(local + ".card.md")
    assert "carrying 50% of the weight" in fsio.read_text(local + ".card.md")
    assert fitted["card"]["facts"]["background"] is None
    on_spark = fit(sample["gallery"], str(tmp_path / "spark.pt"), config.load(sets=sets), engine=spark)
    assert on_spark["facts"]["background"] == card["facts"]["background"]
    a, b, alone = load_checkpoint(local), load_checkpoint(str(tmp_path / "spark.pt")), load_checkpoint(fitted["url"])
    x = torch.randn(64, a.spec.channels).abs()
    with torch.no_grad():
        fa, fb, fg = a.fine(x), b.fine(x), alone.fine(x)
    assert torch.allclose(fa @ fa.T, fb @ fb.T, atol=2e-2)
    assert not torch.allclose(fa @ fa.T, fg @ fg.T, atol=2e-2)
