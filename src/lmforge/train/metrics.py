"""metrics.jsonl (one JSON object per event) and loss.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


class MetricsLog:
    """Append-only JSON lines, flushed per event so a killed run keeps everything it logged."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint's step (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in read_metrics(self.path) if int(line.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, **event) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(event) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path) -> list[dict]:
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill; everything before it is intact
            continue
    return out


def plot_metrics(run: Path, out: Optional[Path] = None) -> Optional[Path]:
    """Draw train and validation loss against step into RUN/loss.png (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    events = read_metrics(Path(run) / "metrics.jsonl")
    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    val = [(e["step"], e["val_loss"]) for e in events if e.get("event") == "val"]
    if not train and not val:
        return None
    out = Path(out) if out else Path(run) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
