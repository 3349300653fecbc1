"""The ``model_version`` of the model a config asks for, from the config and the files, without building
the network (no torchvision backbone, no :class:`~retrieval.model.network.DescriptorModel`): what a
driver needs to check that queries, an index and gallery features fit the configured model before any
work (``retrieval search``: :mod:`retrieval.search.queries`).

It is :meth:`DescriptorModel.model_version` of :func:`~retrieval.model.checkpoints.model_from_config`
(tests/unit/test_model_version.py compares the two), found the cheap way:
- a ``.npz`` delta (``model.checkpoint: default`` included): the version its metadata records (loading
  verifies the rebuilt weights against it), once the bundled base weights are the ones it was made on;
- a full checkpoint (``.pt``): the version it records (loading verifies it), its metadata and the model
  file of an external backbone checked as loading checks them;
- seeded heads on a built-in backbone: :func:`~retrieval.model.spec.fingerprint` of the spec, of the
  backbone weights as read from their file (:func:`~retrieval.model.network.trunk_state`), of GeM's p and
  of the seeded heads (:func:`~retrieval.model.network.seeded_heads`); ``backbone_weights: none``
  (random, unseeded initialisation) has no identity apart from the network: that model is built;
- seeded heads on the user's TorchScript / ONNX file: the same from the file's sha256, input layout and
  embedding width (:func:`~retrieval.model.external.external_identity`: an ONNX file's signature; a
  TorchScript file, which declares no output width, runs one test forward).
``model.runtime: onnx`` (or ``auto`` with ``model.onnx_file``) keeps the version; its file's recorded version is checked.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from retrieval.model.common import ModelError
from retrieval.model.spec import BACKBONE_CHANNELS, EXTERNAL_BACKBONES, MOBILENET_V2_SHA256, ModelSpec, fingerprint

log = logging.getLogger(__name__)


def configured_model_version(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> str:
    """``model_from_config(model_cfg, preprocess_cfg).model_version()``, without building the network
    (module doc); the same :class:`ModelError` as loading for a missing or unfit file."""
    from retrieval.model.checkpoints import configured_checkpoint

    url = configured_checkpoint(model_cfg)
    if url is None:
        version = _seeded_version(model_cfg, preprocess_cfg)
    elif url.endswith(".npz"):
        version = _delta_version(url)
    else:
        version = _checkpoint_version(url, model_cfg)
    if model_cfg.get("runtime", "auto") == "onnx" or model_cfg.get("onnx_file"):
        from retrieval.model.onnx_runtime import check_onnx_file

        check_onnx_file(model_cfg["backbone"], model_cfg.get("onnx_file"), version)
    return version


def _delta_version(url: str) -> str:
    from retrieval.model.delta import delta_meta
    from retrieval.model.network import mobilenet_default_weights

    meta = delta_meta(url)
    spec = ModelSpec.from_meta(meta["spec"])
    base = meta.get("backbone_weights_sha256", MOBILENET_V2_SHA256)
    if spec.backbone != "mobilenet_v2" or base != MOBILENET_V2_SHA256:
        raise ModelError(f"{url}: a delta from {spec.backbone} weights "
                         f"(sha256 {base}): the base of a delta is the bundled "
                         "mobilenet_v2 weights")
    mobilenet_default_weights()      # the base is installed and intact (sha256), as loading needs
    return str(meta["model_version"])


def _checkpoint_version(url: str, model_cfg: Mapping[str, Any]) -> str:
    from retrieval.model.checkpoints import check_checkpoint_backbone, read_checkpoint

    _, spec, recorded = read_checkpoint(url, model_cfg.get("backbone_weights"))
    if spec.backbone in EXTERNAL_BACKBONES:
        from retrieval.model.external import check_model_file

        check_model_file(model_cfg["backbone_weights"], spec.backbone_sha256, url)
    check_checkpoint_backbone(model_cfg, url, spec)
    if not recorded:
        raise ModelError(f"checkpoint {url}: no model_version in its metadata")
    return str(recorded)


def _seeded_version(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> str:
    import torch

    from retrieval.model.network import backbone_weights, seeded_heads, trunk_state

    backbone, weights = model_cfg["backbone"], model_cfg["backbone_weights"]
    # the values as model_from_config passes them to build_model (the spec's JSON is hashed)
    common = {"fine_dim": model_cfg["fine_dim"], "coarse_dim": model_cfg["coarse_dim"],
              "size_hi": preprocess_cfg["size_hi"], "size_lo": preprocess_cfg["size_lo"],
              "resize": preprocess_cfg["resize"]}
    seed = model_cfg["head_seed"]
    if backbone in EXTERNAL_BACKBONES:
        from retrieval.model.external import external_identity

        digest, layout, k = external_identity(backbone, weights, model_cfg.get("input_layout", "auto"),
                                              (common["size_hi"], common["size_lo"]))
        spec = ModelSpec(backbone=backbone, gem_p=0.0, channels=k, backbone_sha256=digest,
                         input_layout=layout, **common)
        return fingerprint(spec, seeded_heads(k, spec.fine_dim, spec.coarse_dim, seed,
                                              fine_identity=k == spec.fine_dim).items())
    state, source = backbone_weights(backbone, weights)
    if state is None:        # random initialisation: no identity apart from the network itself
        from retrieval.model.checkpoints import model_from_config

        log.info("model.backbone_weights=none: building the model for its model_version")
        return model_from_config({**dict(model_cfg), "runtime": "torch"}, preprocess_cfg).model_version()
    k = BACKBONE_CHANNELS[backbone]
    spec = ModelSpec(backbone=backbone, gem_p=model_cfg["gem_p"], channels=k, **common)
    tensors = trunk_state(backbone, state, source)
    tensors["pool.p"] = torch.tensor(float(spec.gem_p))
    tensors.update(seeded_heads(k, spec.fine_dim, spec.coarse_dim, seed))
    return fingerprint(spec, tensors.items())
