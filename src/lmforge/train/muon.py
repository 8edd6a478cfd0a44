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
    trading exactness for speed, which the method shows is harmless. ``g`` is one matrix [m, n] or a
    stack of matrices of one shape [k, m, n], orthogonalized each on its own (one batched product per
    stage instead of one per matrix: on small models much of the optimizer's cost is per-call overhead)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # Frobenius norm of each matrix
    for _ in range(steps):
        xxt = torch.bmm(x, x.mT)
        poly = torch.baddbmm(xxt, xxt, xxt, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    if transposed:
        x = x.mT
    return (x[0] if single else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` get orthogonalized Nesterov momentum; the others get AdamW."""

    def __init__(self, groups: list[dict], *, momentum: float, betas: tuple[float, float], eps: float):
        super().__init__(groups, dict(momentum=momentum, betas=betas, eps=eps, muon=False, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
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

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list] = {}  # matrices of one shape are orthogonalized together
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            buf = state["momentum"]
            buf.mul_(mu).add_(p.grad)
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append((p, p.grad.add(buf, alpha=mu)))
        for (shape, _, _), items in by_shape.items():
            updates = orthogonalize(torch.stack([u for _, u in items]))  # Nesterov momentum, orthogonalized
            # Scale so the update's RMS does not depend on the matrix's aspect ratio.
            updates *= max(1.0, shape[0] / shape[1]) ** 0.5
            for (p, _), update in zip(items, updates):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)


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
