"""Muon: momentum whose update for each hidden weight matrix is orthogonalized (Jordan et al. 2024,
"Muon: an optimizer for hidden layers"). Embeddings, the output head, biases and norm gains keep AdamW,
as the method prescribes. One optimizer object holds both kinds of group so that checkpointing and
the learning-rate schedule treat it like any other optimizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import OptimConfig


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T by a quintic Newton-Schulz iteration. The coefficients
    (3.4445, -4.7750, 2.0315) are the published ones: they push singular values towards ~1 fast,
    trading exactness for speed, which the method shows is harmless."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        xxt = x @ x.T
        x = a * x + (b * xxt + c * xxt @ xxt) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` get orthogonalized Nesterov momentum; the others get AdamW."""

    def __init__(self, groups: list[dict], *, momentum: float, betas: tuple[float, float], eps: float):
        super().__init__(groups, dict(momentum=momentum, betas=betas, eps=eps, muon=False, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    buf = state["momentum"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    update = orthogonalize(update)
                    # Scale so the update's RMS does not depend on the matrix's aspect ratio.
                    update *= max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr)
                else:
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"].item()
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
        return None


def build_muon(model: nn.Module, cfg: OptimConfig) -> Muon:
    hidden, other_decay, other_no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and ".blocks." in f".{name}" and "emb" not in name:
            hidden.append(p)
        elif p.dim() >= 2:
            other_decay.append(p)
        else:
            other_no_decay.append(p)
    # The schedule scales every group by lr_now / cfg.lr, so each group keeps its own peak in base_lr.
    groups = [dict(params=hidden, muon=True, lr=cfg.muon_lr, base_lr=cfg.muon_lr, weight_decay=0.0, kind="muon"),
              dict(params=other_decay, lr=cfg.lr, base_lr=cfg.lr, weight_decay=cfg.weight_decay, kind="decay"),
              dict(params=other_no_decay, lr=cfg.lr, base_lr=cfg.lr, weight_decay=0.0, kind="no_decay")]
    return Muon([g for g in groups if g["params"]], momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2),
                eps=cfg.eps)
