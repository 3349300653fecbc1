"""The label-free post-processing that ``retrieval fit`` folds into a model.

- :func:`fit_whitening`: centering + regularised PCA-whitening of L2-normalised descriptors,
  ``y = W (x - mu)`` with ``W = Lambda^(-power) U^T`` from the eigen-decomposition of the shrunk
  covariance ``(1 - s) C + s (tr C / d) I``. ``power`` 0.5 is full whitening, 0 centering only;
  the shrinkage keeps the 512-d fit stable from a few hundred images (a sample covariance of n < d
  images is singular).
- :func:`pca_projection`: the top principal directions of raw base features, to start adapter 1
  (and a fine head) of a model whose heads were never trained.
- :func:`refit_adapter2`: stage-3 distillation of adapter 2 (low-resolution pooled feature ->
  the fitted coarse space of the full-resolution image), on cached pooled features, keeping the
  weights that do best on a held-out tenth.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class Whitening:
    weight: np.ndarray          # d x d (rows: principal directions scaled by eigenvalue^-power)
    bias: np.ndarray            # d (= -weight @ mean)
    eigenvalues: np.ndarray     # of the shrunk covariance, descending
    shrinkage: float = 0.0      # the shrinkage used

    def summary(self) -> dict:
        ev = self.eigenvalues
        share = np.cumsum(ev) / max(float(ev.sum()), 1e-30)
        return {"dim": int(len(ev)), "shrinkage": round(self.shrinkage, 4), "eig_max": float(ev[0]),
                "eig_min": float(ev[-1]),
                "dims_for_90pct_variance": int(np.searchsorted(share, 0.9) + 1)}


def _covariance(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the rows of ``x``, each row weighted by ``weights`` (None: equally)."""
    x = np.asarray(x, dtype=np.float64)
    if weights is None:
        mu = x.mean(axis=0)
        xc = x - mu
        return mu, xc.T @ xc / max(len(x), 1)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu = w @ x
    xc = x - mu
    return mu, (xc * w[:, None]).T @ xc


def group_weights(sizes: list[int], shares: list[float]) -> np.ndarray:
    """Row weights giving each of the consecutive groups of ``sizes`` rows its ``share`` of the total."""
    return np.concatenate([np.full(n, s / n) for n, s in zip(sizes, shares) if n])


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """The Ledoit-Wolf (2004) estimate of the optimal shrinkage of the sample covariance of ``x``
    towards ``(tr C / d) I``: large for few vectors in many dimensions, small for many."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / n
    mu = np.trace(cov) / d
    delta = (np.sum(cov * cov) - 2 * mu * np.trace(cov) + mu * mu * d) / d     # ||C - mu I||^2 / d
    beta_bar = (np.sum(np.sum(xc * xc, axis=1) ** 2) / n - np.sum(cov * cov)) / (n * d)
    if delta <= 0:
        return 1.0
    return float(min(max(beta_bar, 0.0), delta) / delta)


def layer_statistics(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance a whitening ``y = W x + b`` was fitted from, read as a full
    whitening (power 0.5, as ``retrieval fit`` and training write it): ``W^T W = C^-1``,
    ``mu = -W^-1 b``. An identity layer reads as mean 0, covariance I."""
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    return -np.linalg.solve(w, b), np.linalg.inv(w.T @ w)


def mix(stats: list[tuple[np.ndarray, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a mixture of ``(mean, covariance, share)`` groups."""
    total = sum(s for _, _, s in stats)
    mu = sum(s * m for m, _, s in stats) / total
    cov = sum(s * (c + np.outer(m - mu, m - mu)) for m, c, s in stats) / total
    return mu, cov


def fit_whitening(x: np.ndarray, shrinkage: float | None, power: float,
                  weights: np.ndarray | None = None,
                  prior: tuple[np.ndarray, np.ndarray, float] | None = None) -> Whitening:
    """Whitening of the rows of ``x`` (n x d); see the module doc. ``shrinkage`` None: the
    Ledoit-Wolf estimate (:func:`ledoit_wolf_shrinkage`, of the unweighted rows); ``weights``: each
    row's weight in the mean and covariance (None: equal). ``prior``: ``(mean, covariance, share)``
    statistics (the model's own whitening: :func:`layer_statistics`) mixed with the rows' with that
    share, before the shrinkage (``fit.prior_share``)."""
    if len(x) < 2:
        raise ValueError(f"whitening needs at least 2 vectors, got {len(x)}")
    if shrinkage is None:
        shrinkage = ledoit_wolf_shrinkage(x)
    mu, cov = _covariance(x, weights)
    if prior is not None and prior[2] > 0:
        mu, cov = mix([(mu, cov, 1.0 - prior[2]), prior])
    d = cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    eig, vec = np.linalg.eigh(cov)
    order = np.argsort(eig)[::-1]
    eig, vec = eig[order], vec[:, order]
    eig = np.maximum(eig, max(float(eig[0]), 1e-30) * 1e-9)
    weight = (eig ** -power)[:, None] * vec.T
    return Whitening(weight=weight.astype(np.float32), bias=(-weight @ mu).astype(np.float32),
                     eigenvalues=eig.astype(np.float64), shrinkage=float(shrinkage))


def pca_projection(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(weight dim x K, bias)`` projecting centred rows of ``x`` on their top ``dim`` principal
    directions (fewer directions than ``dim`` exist when K < dim: the rest of the rows are zero)."""
    mu, cov = _covariance(x)
    eig, vec = np.linalg.eigh(cov)
    vec = vec[:, np.argsort(eig)[::-1]]
    k = min(dim, vec.shape[1])
    weight = np.zeros((dim, vec.shape[0]))
    weight[:k] = vec[:, :k].T
    return weight.astype(np.float32), (-weight @ mu).astype(np.float32)


@torch.no_grad()
def set_linear(layer: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    layer.weight.copy_(torch.from_numpy(weight).to(layer.weight.dtype))
    layer.bias.copy_(torch.from_numpy(bias).to(layer.bias.dtype))


def refit_adapter2(model, pooled_hi: torch.Tensor, pooled_lo: torch.Tensor, steps: int, lr: float,
                   seed: int = 0, batch: int = 256) -> dict:
    """Distil adapter 2 so that ``coarse_query(pooled_lo)`` matches ``coarse_gallery(pooled_hi)``
    (the model's final, fitted coarse space). Only adapter 2 changes; the weights with the best
    held-out cosine are kept (the starting ones included)."""
    n = len(pooled_hi)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_val = max(1, n // 10) if n >= 10 else 0
    val, train = perm[:n_val], perm[n_val:] if n_val else perm
    with torch.no_grad():
        teacher = model.coarse_gallery(pooled_hi)

    def val_cos() -> float:
        idx = val if n_val else train
        with torch.no_grad():
            return float((model.coarse_query(pooled_lo[idx]) * teacher[idx]).sum(-1).mean())

    before = best = val_cos()
    best_state = {k: v.clone() for k, v in model.adapter2.state_dict().items()}
    if steps <= 0 or len(train) < 2:
        return {"steps": 0, "held_out": int(n_val), "cosine_before": round(before, 6), "cosine_after": round(before, 6)}
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.adapter2.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    check_every = max(1, steps // 10)
    for step in range(steps):
        idx = train[torch.randint(len(train), (min(batch, len(train)),), generator=g)]
        student = model.coarse_query(pooled_lo[idx])
        loss = (1.0 - F.cosine_similarity(student, teacher[idx], dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            cos = val_cos()
            if cos > best:
                best, best_state = cos, {k: v.clone() for k, v in model.adapter2.state_dict().items()}
    model.adapter2.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"steps": steps, "held_out": int(n_val), "cosine_before": round(before, 6), "cosine_after": round(best, 6)}
