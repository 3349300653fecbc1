"""``retrieval fit``: fit the configured model to a gallery, without labels (docs/quality.md).

    retrieval fit --input GALLERY_IMAGES --output MODEL_URL [--engine local]

1. a uniform sample of ``fit.sample`` gallery images (all when fewer; seeded) is decoded and
   encoded once at R_hi and once at R_lo - the base (pooled) features, in Spark tasks or locally;
2. a model whose heads were never trained (``heads: seed:N``, e.g. a user's TorchScript/ONNX
   embedding model) first gets adapter 1 - and a fine head when the embedding is not 512-d - from
   the principal components of the base features, and adapter 2 as a copy of adapter 1;
3. centering + regularised whitening (:mod:`retrieval.fit.whiten`) of the fine (512-d) and coarse
   (128-d) outputs, folded into the model as two linear layers before the final L2 normalisation
   (applied at extraction: no cost per rerank pair);
4. adapter 2 is re-distilled (stage 3) so low-resolution query codes land in the fitted coarse space;
5. the model is written as a checkpoint at ``MODEL_URL`` (usable as ``model.checkpoint``; its own
   ``model_version``) with a model card inside and beside it (``MODEL_URL.card.json``/``.md``).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from retrieval import fsio, outputs
from retrieval.config import Config
from retrieval.engine import Engine, as_engine, task_threads
from retrieval.extract import inputs as inputs_mod

log = logging.getLogger(__name__)
MIN_IMAGES = 20          # fewer decodable images than this: refused (nothing to fit)


class TooFewImagesError(ValueError):
    """The gallery has fewer than ``MIN_IMAGES`` readable images: nothing to fit."""


@dataclass(frozen=True)
class FitJob:
    """Plain values a task needs (the model is rebuilt from them per process)."""
    model_cfg: dict
    preprocess_cfg: dict
    model_version: str
    batch_size: int
    threads: int | str              # a number or auto
    storage_options: dict | None = None
    key_column: str | None = None
    bytes_column: str | None = None


def pooled_feature_rows(job: FitJob, rows: list[tuple[str, str]]) -> list[tuple[str, bytes | None, bytes | None, str | None]]:
    """``(image_id, pooled R_hi float16 bytes, pooled R_lo float16 bytes, error)`` per row."""
    import torch

    from retrieval.extract.preprocess import DecodePolicy, prepare_items
    from retrieval.model.task import task_model

    model, device = task_model(job)
    policy = DecodePolicy.from_config(job.preprocess_cfg)
    spec = model.spec
    out: list[tuple[str, bytes | None, bytes | None, str | None]] = []
    batch: list[tuple[str, list]] = []

    def flush() -> None:
        if not batch:
            return
        with torch.inference_mode():
            hi = model.pooled(torch.stack([t[0] for _, t in batch]).to(device)).float().cpu().numpy()
            lo = model.pooled(torch.stack([t[1] for _, t in batch]).to(device)).float().cpu().numpy()
        for (image_id, _), h, lw in zip(batch, hi.astype(np.float16), lo.astype(np.float16)):
            out.append((image_id, h.tobytes(), lw.tobytes(), None))
        batch.clear()

    for image_id, _, tensors, _, _, err in prepare_items(rows, (spec.size_hi, spec.size_lo), spec.resize, policy,
                                                         job.key_column, job.bytes_column,
                                                         decoder=job.preprocess_cfg.get("decoder", "fast"),
                                                         workers=task_threads(job.threads), ahead=2 * job.batch_size):
        if err is not None:
            out.append((image_id, None, None, err))
            continue
        batch.append((image_id, tensors))
        if len(batch) >= job.batch_size:
            flush()
    flush()
    return out


def _partition(job: FitJob, rows: Iterator[tuple[str, str]]) -> Iterator[tuple]:
    yield from pooled_feature_rows(job, list(rows))


def sample_rows(listing, sample: int, seed: int) -> list[tuple[str, str]]:
    """A uniform sample (without replacement, seeded) of the listing's valid rows, in id order."""
    d = listing.to_pydict()
    valid = [(i, u) for i, u, e in zip(d["image_id"], d["uri"], d["error"]) if e is None]
    if len(valid) > sample:
        pick = np.random.default_rng(seed).choice(len(valid), size=sample, replace=False)
        valid = [valid[i] for i in sorted(pick)]
    return sorted(valid)


def encode_sample(job: FitJob, rows: list[tuple[str, str]], engine: Engine) -> list[tuple]:
    """The sample's pooled features, in batches of rows over the engine's tasks."""
    parts = max(1, min(len(rows) // max(job.batch_size, 1), 4 * engine.parallelism))
    return engine.map_batches(functools.partial(_partition, job), rows, parts, "fit")


def _as_matrix(blobs: list[bytes], dim: int):
    import torch

    return torch.from_numpy(np.frombuffer(b"".join(blobs), np.float16).reshape(-1, dim).astype(np.float32))


def fit_model(model, p_hi, p_lo, fit_cfg: Config, extra_hi=None) -> dict:
    """Steps 2-4 of the module doc on ``model`` (in place), from pooled features; returns the facts
    for the model card. ``extra_hi``: pooled features of background images that join the gallery's
    in the whitening fit with ``fit.background_share`` of the weight (``fit.background``; not in the
    PCA heads nor the adapter-2 re-fit)."""
    import torch

    from retrieval.fit import whiten

    facts: dict[str, Any] = {}
    x_hi = p_hi.numpy()
    if model.spec.heads.startswith("seed"):            # never trained: heads from the base features
        w, b = whiten.pca_projection(x_hi, model.spec.coarse_dim)
        whiten.set_linear(model.adapter1, w, b)
        if isinstance(model.fine_head, torch.nn.Linear):
            w, b = whiten.pca_projection(x_hi, model.spec.fine_dim)
            whiten.set_linear(model.fine_head, w, b)
        model.adapter2_from_adapter1()
        facts["heads_initialised"] = "pca"
    share_p = float(fit_cfg["prior_share"]) if "prior_share" in fit_cfg else 0.0
    priors = {name: (*whiten.layer_statistics(layer.weight.detach().numpy(), layer.bias.detach().numpy()), share_p)
              for name, layer in (("fine", model.fine_white), ("coarse", model.coarse_white))
              if share_p > 0 and layer is not None}          # the model's own whitening (fit.prior_share)
    model.enable_whitening()
    for layer in (model.fine_white, model.coarse_white):   # refit from scratch (identity first)
        whiten.set_linear(layer, np.eye(layer.in_features, dtype=np.float32),
                          np.zeros(layer.in_features, np.float32))
    x_white, weights = p_hi, None
    if extra_hi is not None and len(extra_hi):        # gallery and background, weighted by their shares
        x_white = torch.cat([p_hi, extra_hi])
        share = float(fit_cfg["background_share"])
        weights = whiten.group_weights([len(p_hi), len(extra_hi)], [1.0 - share, share])
    with torch.no_grad():
        fine = torch.nn.functional.normalize(model.fine_head(x_white), dim=-1).numpy()
        coarse = torch.nn.functional.normalize(model.adapter1(x_white), dim=-1).numpy()
    for name, layer, x in (("fine", model.fine_white, fine), ("coarse", model.coarse_white, coarse)):
        wt = whiten.fit_whitening(x, None if fit_cfg["shrinkage"] == "auto" else fit_cfg["shrinkage"], fit_cfg["power"],
                                  weights=weights, prior=priors.get(name))
        whiten.set_linear(layer, wt.weight, wt.bias)
        facts[f"{name}_whitening"] = {**wt.summary(), "prior_share": share_p if name in priors else 0.0}
    facts["adapter2"] = whiten.refit_adapter2(model, p_hi, p_lo, fit_cfg["adapter2_steps"], fit_cfg["adapter2_lr"],
                                              seed=fit_cfg["seed"])
    return facts


def encode_background(job: FitJob, url: str | None, fit_cfg: Config, engine: Engine,
                      channels: int) -> tuple[Any, dict | None]:
    """The pooled R_hi features of a seeded sample of ``fit.background``'s images (``(None, None)``
    without one) and the card's facts about them."""
    if not url:
        return None, None
    listing = inputs_mod.list_inputs(url, "auto", 1, None, None)
    rows = sample_rows(listing, fit_cfg["sample"], fit_cfg["seed"])
    ok = sorted((r for r in encode_sample(job, rows, engine) if r[3] is None), key=lambda r: r[0])
    if len(ok) < 2:
        raise ValueError(f"fit.background {url}: {len(ok)} readable images; give a folder of unrelated images")
    facts = {"url": url, "images_listed": listing.num_rows, "images_used": len(ok),
             "share": float(fit_cfg["background_share"])}
    return _as_matrix([r[1] for r in ok], channels), facts


def card_markdown(card: dict) -> str:
    lines = [f"# Fitted model {card['model_version']}", "",
             f"Fitted by `retrieval fit` on {card['created']} from `{card['input']}`: "
             f"{card['images_used']:,} images of {card['images_listed']:,} listed "
             f"(sample {card['sample']:,}, seed {card['seed']}; {card['image_errors']} unreadable).", "",
             f"- base model: `{card['base_model_version']}` ({card['backbone']}, heads: {card['base_heads']})",
             f"- whitening: shrinkage {card['shrinkage']} (fine {card['facts']['fine_whitening']['shrinkage']}, "
             f"coarse {card['facts']['coarse_whitening']['shrinkage']}), power {card['power']}"
             f" (fine: {card['facts']['fine_whitening']['dims_for_90pct_variance']} dims hold 90% of the"
             f" variance; coarse: {card['facts']['coarse_whitening']['dims_for_90pct_variance']})",
             f"- adapter 2 re-fit: {card['facts']['adapter2']['steps']} steps, held-out cosine "
             f"{card['facts']['adapter2']['cosine_before']} -> {card['facts']['adapter2']['cosine_after']}"
             + (" (the re-fit did not improve the held-out images: the starting weights were kept)"
                if card['facts']['adapter2']['cosine_after'] <= card['facts']['adapter2']['cosine_before'] else ""),
             f"- sample fingerprint (sha256 of the image ids used): `{card['sample_sha256']}`", ""]
    bg = card["facts"].get("background")
    if bg:
        lines.insert(-1, f"- whitening fitted together with {bg['images_used']:,} background images (of "
                         f"{bg['images_listed']:,} listed) from `{bg['url']}` (fit.background), carrying "
                         f"{bg['share']:.0%} of the weight")
    prior = card["facts"]["fine_whitening"].get("prior_share", 0.0)
    if prior:
        lines.insert(-1, f"- the base model's own whitening statistics (its training images) mixed into the fit, "
                         f"carrying {prior:.0%} of the weight (fit.prior_share)")
    if card["facts"].get("heads_initialised"):
        lines.insert(-1, "- adapter 1 / fine head initialised from the principal components (heads were untrained)")
    return "\n".join(lines) + "\n"


@outputs.leased
def fit(input_url: str, output_url: str, cfg: Config, engine: Engine | Any = None, overwrite: bool = False) -> dict:
    """Run ``retrieval fit`` on ``engine`` (:func:`retrieval.engine.as_engine`); returns the model card
    (also written beside the checkpoint). ``overwrite``: replace a checkpoint of another identity."""
    from retrieval.model.checkpoints import model_from_config, save_checkpoint

    t0 = time.monotonic()
    engine = as_engine(engine)
    fit_cfg = cfg["fit"]
    fsio.configure(cfg["io.storage_options"])
    if output_url.endswith(".npz"):
        raise ValueError(f"--output {output_url}: fit writes a full checkpoint; give a URL not ending in "
                         ".npz (e.g. model.pt)")
    extract_cfg = cfg.extract
    listing = inputs_mod.list_inputs(input_url, extract_cfg.input_format, 1, extract_cfg.key_column,
                                     extract_cfg.bytes_column)
    rows = sample_rows(listing, fit_cfg["sample"], fit_cfg["seed"])
    if len(rows) < MIN_IMAGES:
        raise TooFewImagesError(f"fit needs at least {MIN_IMAGES} readable gallery images; {input_url} "
                         f"lists {len(rows)} valid ones")
    fsio.ensure_writable(output_url.rstrip("/").rsplit("/", 1)[0] if "/" in output_url else ".")
    fs, path = fsio.url_to_fs(output_url)
    if fs.isdir(path):
        raise ValueError(f"--output {output_url} is a directory; give the URL of the checkpoint file to write")
    outputs.claim(output_url, outputs.identity("fit", cfg, [input_url]), cfg, overwrite, file=True)
    model = model_from_config(cfg["model"].to_dict(), cfg["preprocess"].to_dict())
    base_version, base_heads = model.model_version(), model.spec.heads
    job = FitJob(model_cfg=cfg["model"].to_dict(), preprocess_cfg=cfg["preprocess"].to_dict(),
                 model_version=base_version, batch_size=fit_cfg["batch_size"], threads=fit_cfg["threads"],
                 storage_options=cfg["io.storage_options"], key_column=extract_cfg.key_column,
                 bytes_column=extract_cfg.bytes_column)
    log.info("fit %s: %d of %d listed images, base model %s", input_url, len(rows), listing.num_rows,
             base_version)
    encoded = encode_sample(job, rows, engine)
    ok = sorted((r for r in encoded if r[3] is None), key=lambda r: r[0])
    errors = [r for r in encoded if r[3] is not None]
    if len(ok) < MIN_IMAGES:
        raise TooFewImagesError(f"fit needs at least {MIN_IMAGES} decodable images; {len(errors)} of "
                         f"{len(encoded)} sampled could not be read (first: {errors[0][3] if errors else '-'})")
    t_encode = time.monotonic() - t0
    k = model.spec.channels
    p_hi, p_lo = _as_matrix([r[1] for r in ok], k), _as_matrix([r[2] for r in ok], k)
    b_hi, bg_facts = encode_background(job, fit_cfg["background"], fit_cfg, engine, k)
    facts = fit_model(model, p_hi, p_lo, fit_cfg, extra_hi=b_hi) | {"background": bg_facts}
    model.spec.heads = "fitted"
    ids_sha = hashlib.sha256("\n".join(r[0] for r in ok).encode()).hexdigest()
    card = {"stage": "fit", "input": input_url, "output": output_url, "images_listed": listing.num_rows,
            "images_used": len(ok), "image_errors": len(errors), "sample": fit_cfg["sample"], "seed": fit_cfg["seed"],
            "sample_sha256": ids_sha, "base_model_version": base_version, "base_heads": base_heads,
            "backbone": model.spec.backbone, "shrinkage": fit_cfg["shrinkage"], "power": fit_cfg["power"],
            "facts": facts, "engine": engine.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta = save_checkpoint(model, output_url, extra={"fit": card})
    card["model_version"] = meta["model_version"]
    card["timings"] = {"encode_s": round(t_encode, 3), "total_s": round(time.monotonic() - t0, 3)}
    fsio.write_json(output_url + ".card.json", card)
    fsio.write_bytes(output_url + ".card.md", card_markdown(card).encode())
    log.info("fit done: model_version %s from %d images in %.1fs -> %s", card["model_version"], len(ok),
             card["timings"]["total_s"], output_url)
    return card
