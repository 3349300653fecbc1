"""The compact delta checkpoint: round trip, size, integrity, and the shipped default model."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from retrieval.model.delta import DEFAULT_MODEL, export_delta, load_delta
from retrieval.model.network import ModelError, build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained():
    m = build_model(size_hi=64, size_lo=48)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what training does: heads, adapter 2 and the last block move
        for name in ("fine_head.weight", "adapter1.weight", "adapter2.0.weight", "adapter2.2.bias",
                     "backbone.18.0.weight", "pool.p"):
            p = dict(m.named_parameters())[name]
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    m.spec.heads = "trained"
    return m


def test_round_trip_is_close_and_verified(tmp_path):
    m = _trained()
    url = str(tmp_path / "m.npz")
    shipped = export_delta(m, url, head_seed=0, card={"note": "test"})
    loaded = load_delta(url)
    assert loaded.model_version() == shipped.model_version()
    assert loaded.spec.heads == "trained" and loaded.spec.size_hi == 64
    assert loaded.spec.extra["card"] == {"note": "test"}
    a, b = m.state_dict(), loaded.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3), k   # int8 rounding of 0.01-sized deltas
    assert torch.equal(a["pool.p"], b["pool.p"]) and torch.equal(a["adapter2.2.bias"], b["adapter2.2.bias"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        cos = (m.encode_gallery(x)[1] * loaded.encode_gallery(x)[1]).sum(-1)
    assert float(cos.min()) > 0.999
    # only the changed tensors are stored, as int8: far smaller than a full checkpoint
    assert os.path.getsize(url) < 6e6


def test_tampered_or_foreign_files_are_refused(tmp_path):
    url = str(tmp_path / "m.npz")
    export_delta(_trained(), url)
    npz = dict(np.load(url))
    npz["adapter1.weight::q"] = npz["adapter1.weight::q"].copy()
    npz["adapter1.weight::q"][0, 0] ^= 1
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **npz)
    with pytest.raises(ModelError, match="model_version mismatch"):
        load_delta(bad)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a delta checkpoint"):
        load_delta(str(tmp_path / "junk.npz"))
    with pytest.raises(ModelError, match="not found"):
        load_delta(str(tmp_path / "missing.npz"))


@pytest.mark.skipif(not os.path.exists(DEFAULT_MODEL), reason="default model asset not built")
def test_shipped_default_model_loads_and_is_trained():
    m = load_delta()
    assert m.spec.heads == "fitted" and m.spec.backbone == "mobilenet_v2"   # trained, then `retrieval fit`
    assert (m.spec.size_hi, m.spec.size_lo) == (224, 160)
    assert os.path.getsize(DEFAULT_MODEL) < 8e6
    seed = build_model()
    assert not torch.equal(m.adapter1.weight, seed.adapter1.weight)
    assert torch.equal(m.backbone[0][0].weight, seed.backbone[0][0].weight)   # the first 11 blocks: frozen
    # the backbone itself was trained (its last blocks), and the model ships fitted (whitened)
    assert not torch.equal(m.backbone[18][0].weight, seed.backbone[18][0].weight)
    assert not torch.equal(m.backbone[11].conv[0][0].weight, seed.backbone[11].conv[0][0].weight)
    assert torch.equal(m.backbone[10].conv[0][0].weight, seed.backbone[10].conv[0][0].weight)
    assert m.spec.whiten and m.fine_white is not None
