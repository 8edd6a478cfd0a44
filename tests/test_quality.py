"""Training quality on real text (slow: run with `python -m pytest -m slow tests/test_quality.py`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_char_tiny_at_nanogpt_cpu_settings_reaches_1_90(shakespeare_path, tmp_path):
    """char-tiny, batch 12, block 64, 2000 steps, lr 1e-3 (warmup 100, cosine to 1e-4), no dropout,
    weight decay 0.1, betas 0.9/0.99, last 10% held out: validation loss <= 1.90 (nanoGPT: 1.88)."""
    assert main(["tokenizer", "train", "--input", str(shakespeare_path), "--kind", "char",
                 "--out", str(tmp_path / "tok")]) == 0
    assert main(["prepare", "--input", str(shakespeare_path), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.1"]) == 0
    assert main(["pretrain", "--config", str(ROOT / "configs" / "shakespeare-char-nanogpt.yaml"),
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--train.no-plot"]) == 0
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "val"][-1]
    assert final["step"] == 2000
    assert final["val_loss"] <= 1.90, final
