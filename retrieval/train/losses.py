"""The loss functions of the three stages (pure tensor maths, no model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i's positive is ``positive[i]``; every other row of ``positive`` is a negative."""
    a, p = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    logits = a @ p.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(student, teacher)); the teacher gets no gradient."""
    return (1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def koleo_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo regulariser (Sablayrolles et al. 2019; SSCD's entropy term, DINOv2):
    ``-mean(log(distance to the nearest other row))`` of the L2-normalised rows; spreads the batch."""
    z = F.normalize(z, dim=-1)
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    return -torch.log(F.pairwise_distance(z, z[nearest], eps=eps) + eps).mean()


def similarity_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between each row's softmax over its similarities to the OTHER rows of the
    batch (cosine / ``temperature``): the student learns the teacher's similarity structure, whatever
    the two embeddings' dimensions. The teacher gets no gradient."""
    n = len(student)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach().float(), dim=-1)
    log_s = F.log_softmax((s @ s.T)[off].view(n, n - 1) / temperature, dim=1)
    log_t = F.log_softmax((t @ t.T)[off].view(n, n - 1) / temperature, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
