"""Smoke tests of the benchmark scripts (bench/): they run end to end at tiny sizes and print their tables.
Speed itself is never asserted here (house rule: speed targets are checked by the bench scripts)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402


def test_interleave_and_table(capsys):
    calls = []
    t = common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # rotated order
    text = common.table("T", ["x", "y"], [[1, "two"]])
    assert "| x | y   |" in text and "| 1 | two |" in text
    assert common.verdict(1.1, 1.0).startswith("met") and common.verdict(2.0, 1.75, False).startswith("NOT")
    assert common.matmul_peak_flops(64, rounds=1) > 0 and common.stream_bandwidth(8, rounds=1) > 0


def test_reference_model_trains():
    import torch

    from bench.ref_gpt import RefConfig, RefGPT, ref_optimizer, ref_step

    torch.manual_seed(0)
    m = RefGPT(RefConfig(vocab_size=17, block_size=8, n_layers=1, n_heads=2, d_model=16))
    opt = ref_optimizer(m, lr=1e-2)
    x = torch.randint(0, 17, (4, 8))
    losses = [ref_step(m, opt, x, x) for _ in range(20)]
    assert losses[-1] < losses[0]


def test_train_step_bench_smoke(capsys):
    from bench import train_step

    rows = train_step.main(["--config", "tiny", "--rounds", "1", "--reps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "tiny gpt2: lmforge vs transformers" in out and "MFU" in out
    assert any(r[0] == "tiny nanogpt: lmforge" for r in rows)


def test_gpu_bench_dry_run(capsys):
    pytest.importorskip("transformers")
    from bench import gpu

    rows = gpu.main(["--dry-run", "--skip-ttq"])
    assert "dry run" in rows[0][0] and "MFU" in rows[0][2]


def test_prepare_speed_bench_smoke(capsys):
    pytest.importorskip("psutil")
    from bench import prepare_speed

    rows = prepare_speed.main(["--mb", "1", "--vocab", "300"])
    out = capsys.readouterr().out
    assert "MB/s per core" in out and "process tree PSS" in out
    pss = float(rows[2][1].split()[0])
    assert 10 < pss < 4096  # a real sample of the child's tree was taken
