"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""
from __future__ import annotations

import math

from ..config import OptimConfig


def lr_at(step: int, total: int, cfg: OptimConfig, peak: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    cosine: linear warmup, then cosine from the peak to min_lr at the last step (Loshchilov & Hutter 2017).
    wsd: warmup, a long stable phase at the peak, then a linear decay to min_lr over the last
         ``decay_fraction`` of the run (warmup-stable-decay, Hu et al. 2024 "MiniCPM").
    linear: warmup then linear decay to min_lr.  constant: warmup then the peak.
    """
    peak = cfg.lr if peak is None else peak
    floor = cfg.min_lr * (peak / cfg.lr)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * total)))
        start = total - decay_steps
        if step < start:
            return peak
        frac = (step - start + 1) / decay_steps
        return peak + (floor - peak) * min(1.0, frac)
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return peak + (floor - peak) * frac
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))
