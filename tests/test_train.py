"""The training loop: exact resume, schedules, optimizer groups, run directory, bad input."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge.config import (ConfigError, ModelConfig, OptimConfig, PrepareConfig, PretrainConfig, TokenizerConfig,
                            TrainConfig, UserError)
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import clip_and_step, param_groups
from lmforge.train.schedule import lr_at

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("traindata")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tok = Tokenizer.train(TokenizerConfig(input=[str(corpus)], kind="char", out=str(root / "tok")))
    tok.save(root / "tok")
    prepare(PrepareConfig(input=[str(corpus)], tokenizer=str(root / "tok"), out=str(root / "data"),
                          val_fraction=0.1, workers=1), progress=False)
    return root / "data"


def tiny_cfg(data_dir: Path, out: Path, **train_kw) -> PretrainConfig:
    model = ModelConfig(block_size=32, n_layers=2, n_heads=2, d_model=32, dropout=0.1, pos="rope", norm="rmsnorm",
                        mlp="swiglu", bias=False)
    train = dict(steps=16, batch_size=4, grad_accum=2, eval_every=4, eval_batches=2, save_every=8, log_every=1,
                 progress=False, plot=False, seed=7)
    train.update(train_kw)
    return PretrainConfig(data=str(data_dir), out=str(out), model=model,
                          optim=OptimConfig(lr=3e-3, warmup_steps=3, min_lr=3e-4), train=TrainConfig(**train))


def losses(run: Path, event="train", key="loss") -> dict[int, float]:
    return {e["step"]: e[key] for e in read_metrics(run / "metrics.jsonl") if e["event"] == event}


def run_pretrain(cfg):
    from lmforge.train.pretrain import pretrain

    return pretrain(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_pretrain(tiny_cfg(data_dir, out))
    return out


def test_run_directory_contents(reference_run):
    assert (reference_run / "run.yaml").is_file()
    assert (reference_run / "final" / "model.safetensors").is_file()
    assert (reference_run / "final" / "tokenizer.json").is_file()
    assert (reference_run / "checkpoints" / "step-000016" / "train_state.pt").is_file()
    meta = json.loads((reference_run / "final" / "config.json").read_text())
    assert meta["format"] == "lmforge" and meta["model"]["n_layers"] == 2
    train = losses(reference_run)
    assert sorted(train) == list(range(1, 17))
    assert train[16] < train[1]  # it learns
    val = losses(reference_run, "val", "val_loss")
    assert sorted(val) == [4, 8, 12, 16]
    assert not list(reference_run.glob("**/.*tmp-*"))  # no leftovers of atomic writes


def test_resume_is_bitwise_identical(data_dir, reference_run, tmp_path):
    out = tmp_path / "run"
    run_pretrain(tiny_cfg(data_dir, out, stop_after=8))
    assert not (out / "final").exists()
    assert max(losses(out)) == 8
    run_pretrain(dataclasses.replace(tiny_cfg(data_dir, out), resume=True))
    ref, got = losses(reference_run), losses(out)
    assert got == ref  # every step, bit for bit (JSON floats round-trip exactly)
    assert losses(out, "val", "val_loss") == losses(reference_run, "val", "val_loss")


def test_resume_after_interrupt_mid_accumulation(data_dir, reference_run, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a gradient-accumulation step: the partial step is dropped, the last
    full step is saved, and resuming replays exactly."""
    import lmforge.train.pretrain as pt

    out = tmp_path / "run"
    calls = {"n": 0}
    real = pt.causal_lm_loss

    def flaky(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 2 * 10 + 2:  # step 11, second micro-batch
                raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(pt, "causal_lm_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_cfg(data_dir, out))
    monkeypatch.setattr(pt, "causal_lm_loss", real)
    assert (out / "checkpoints" / "step-000010").is_dir()
    run_pretrain(dataclasses.replace(tiny_cfg(data_dir, out), resume=True))
    assert losses(out) == losses(reference_run)


def test_resume_after_sigkill(data_dir, reference_run, tmp_path):
    """A process killed with SIGKILL (no chance to save) after its last checkpoint resumes exactly."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import lmforge.train.pretrain as pt
        from test_train import tiny_cfg
        from pathlib import Path
        real, n = pt.causal_lm_loss, [0]
        def killer(model, batch):
            if model.training:
                n[0] += 1
                if n[0] == 2 * 12 + 1:  # step 13, first micro-batch: after the step-8 checkpoint
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(model, batch)
        pt.causal_lm_loss = killer
        pt.pretrain(tiny_cfg(Path({str(data_dir)!r}), Path({str(out)!r})), log=lambda *_: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(losses(out)) == 12  # it logged past the checkpoint before dying
    run_pretrain(dataclasses.replace(tiny_cfg(data_dir, out), resume=True))
    assert losses(out) == losses(reference_run)


def test_existing_run_needs_resume(data_dir, reference_run):
    with pytest.raises(UserError, match="--resume"):
        run_pretrain(tiny_cfg(data_dir, reference_run))


def test_resume_with_other_model_config_fails(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretrain(tiny_cfg(data_dir, out, steps=4, stop_after=2, eval_every=0))
    cfg = tiny_cfg(data_dir, out, steps=4, eval_every=0)
    cfg = dataclasses.replace(cfg, resume=True, model=dataclasses.replace(cfg.model, d_model=64))
    with pytest.raises(UserError, match="does not match.*d_model"):
        run_pretrain(cfg)


def test_block_size_beyond_model_positions(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, tmp_path / "run", block_size=64)
    with pytest.raises(ConfigError, match="train.block_size.*beyond"):
        cfg.validate()


def test_missing_data_dir(tmp_path):
    cfg = tiny_cfg(tmp_path / "nope", tmp_path / "run")
    with pytest.raises(UserError, match="prepare"):
        run_pretrain(cfg)


def test_vocab_too_small_for_data(data_dir, tmp_path):
    cfg = tiny_cfg(data_dir, tmp_path / "run")
    cfg = dataclasses.replace(cfg, vocab_from_data=False, model=dataclasses.replace(cfg.model, vocab_size=8))
    with pytest.raises(UserError, match="vocab_size"):
        run_pretrain(cfg)


def test_unwritable_out_dir(data_dir, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "run"  # a path under a regular file can never be created, even by root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "run"
    with pytest.raises(UserError, match="run directory|cannot"):
        run_pretrain(tiny_cfg(data_dir, out, steps=2))


# --------------------------------------------------------------------------------------------------
# schedules and optimizer groups


def test_cosine_schedule_shape():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    mid = 10 + 90 // 2
    assert lr_at(mid, 100, cfg) == pytest.approx(0.55, abs=1e-6)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule_shape():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, cfg) == 1.0 and lr_at(79, 100, cfg) == 1.0
    assert lr_at(80, 100, cfg) < 1.0
    assert lr_at(99, 100, cfg) == pytest.approx(0.0)


def test_param_groups_exclude_biases_and_norms():
    from lmforge.models.decoder import DecoderLM

    model = DecoderLM(ModelConfig(n_layers=1, n_heads=2, d_model=16, bias=True))
    groups = {g["kind"]: g for g in param_groups(model, 0.1)}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay_ids) == (p.dim() >= 2), name
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == model.num_params()  # the tied head is counted once


def _clip_case(fused: bool, scale: float, seed: int = 0):
    """Two copies of a small module with the same gradients (times ``scale``) and AdamW optimizers."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3, bias=False))
        m(torch.randn(4, 7)).square().sum().mul(scale).backward()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None)
        pairs.append((m, opt))
    return pairs


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale", [100.0, 1e-4])
def test_clip_and_step_equals_clip_grad_norm_then_step(fused, scale, monkeypatch):
    (m1, o1), (m2, o2) = _clip_case(fused, scale)
    want = float(torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5))
    o1.step()
    assert (want > 0.5) == (scale > 1)  # one case over the limit, one under it
    if fused:  # the fused optimizer takes the factor in its own pass: clip_grad_norm_ is not called
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("multiplied"))
    got = clip_and_step(o2, m2.parameters(), 0.5)
    assert got == pytest.approx(want, rel=1e-6)
    assert not hasattr(o2, "grad_scale")
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-6, atol=1e-9)  # left clipped, as clip_grad_norm_ does
    for s1, s2 in zip(o1.state.values(), o2.state.values()):
        torch.testing.assert_close(s2["exp_avg"], s1["exp_avg"], rtol=1e-6, atol=1e-9)


def test_clip_and_step_on_part_of_the_optimizers_parameters_clips_only_those():
    (m1, o1), (m2, o2) = _clip_case(True, 100.0)
    want = float(torch.nn.utils.clip_grad_norm_(m1[0].parameters(), 0.5))
    o1.step()
    assert clip_and_step(o2, m2[0].parameters(), 0.5) == pytest.approx(want, rel=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):  # the second layer's gradient was not scaled
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-7)


def test_clip_and_step_without_clipping_and_with_a_nonfinite_norm():
    (m1, o1), (m2, o2) = _clip_case(True, 10.0)
    before = [p.grad.clone() for p in m2.parameters()]
    o1.step()
    assert clip_and_step(o2, m2.parameters(), 0.0) is None
    for p1, p2, g in zip(m1.parameters(), m2.parameters(), before):
        assert torch.equal(p1, p2) and torch.equal(p2.grad, g)
    next(m2.parameters()).grad[0, 0] = float("inf")
    assert clip_and_step(o2, m2.parameters(), 1.0) == float("inf")
    assert not hasattr(o2, "grad_scale")


def test_muon_orthogonalizes_and_trains():
    from lmforge.train.muon import orthogonalize

    g = torch.randn(32, 64)
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.max() < 1.3 and s.min() > 0.5  # singular values pushed towards 1
    stack = torch.stack([g, 3 * torch.randn(32, 64), g.roll(1, 0)])  # one batched call, each on its own
    for got, one in zip(orthogonalize(stack), stack):
        torch.testing.assert_close(got, orthogonalize(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(orthogonalize(g.T), o.T, rtol=1e-5, atol=1e-5)  # tall matrices via the transpose
    from lmforge.models.decoder import DecoderLM
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=32, block_size=16, n_layers=2, n_heads=2, d_model=32))
    opt = build_optimizer(model, OptimConfig(name="muon", lr=3e-3, muon_lr=0.02), "cpu")
    assert any(g.get("muon") for g in opt.param_groups)
    x = torch.randint(0, 32, (8, 16))
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off():
    import platform

    code = "from lmforge.train.memory import keep_freed_memory as k; print(k(), k())"
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_MALLOC_TUNE"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "LMFORGE_MALLOC_TUNE": "0"})
    assert off.stdout.split() == ["False", "False"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on.stdout.split() == ["True", "True"]


def test_fp16_training_scales_the_loss_and_checkpoints_the_scale(data_dir, reference_run, tmp_path, monkeypatch):
    """fp16 autocast (a CUDA option; CPU autocast stands in for it here) trains through a GradScaler whose
    state is checkpointed with the run."""
    from lmforge.train import loop

    monkeypatch.setattr(loop, "pick_dtype", lambda name, device: torch.float16)
    scalers = []
    real = torch.amp.GradScaler

    def spy(*a, **k):
        scalers.append(real(*a, **k))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", spy)
    run = tmp_path / "run"
    run_pretrain(tiny_cfg(data_dir, run, steps=8))
    assert len(scalers) == 1
    state = torch.load(run / "checkpoints" / "step-000008" / "train_state.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] == scalers[0].get_scale() > 0
    train = losses(run)
    assert all(math.isfinite(v) for v in train.values()) and train[8] < train[1]
    # The first step's gradient norm, unscaled, is the fp32 run's (same seed) up to fp16 rounding.
    assert losses(run, key="grad_norm")[1] == pytest.approx(losses(reference_run, key="grad_norm")[1], rel=0.05)


def test_clip_and_step_with_a_grad_scaler_unscales_and_skips_nonfinite_steps():
    (m1, o1), (m2, o2) = _clip_case(True, 100.0)
    want = float(torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5))
    o1.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for p in m2.parameters():  # the gradients of the scaled loss
        p.grad = scaler.scale(p.grad)
    assert clip_and_step(o2, m2.parameters(), 0.5, scaler) == pytest.approx(want, rel=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in m2.parameters()]
    next(m2.parameters()).grad[0, 0] = float("nan")
    clip_and_step(o2, m2.parameters(), 0.5, scaler)
    assert all(torch.equal(p, b) for p, b in zip(m2.parameters(), before))  # the step was skipped
    assert scaler.get_scale() < 1024.0


def test_fp16_steps_that_overflow_are_skipped_and_marked(data_dir, tmp_path, monkeypatch):
    from lmforge.train import loop

    monkeypatch.setattr(loop, "pick_dtype", lambda name, device: torch.float16)
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **dict(k, init_scale=2.0 ** 100)))
    run = tmp_path / "run"
    run_pretrain(tiny_cfg(data_dir, run, steps=2, eval_every=100))
    first = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"][0]
    assert first.get("skipped") is True and first["grad_norm"] is None  # a scale of 2^100 overflows fp16
    assert (run / "final").is_dir()


def _no_dropout(cfg: PretrainConfig) -> PretrainConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))


def test_compiled_training_matches_eager(data_dir, tmp_path):
    """--train.compile (torch.compile, what the GPU setting uses) trains the same model: on the CPU the
    inductor backend compiles it with the C++ compiler, and the first step's loss and gradient norm are the
    eager ones up to rounding. Dropout is off: compiled code draws its own random numbers."""
    import shutil

    from lmforge.train.pretrain import pretrain

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    notes = []
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(_no_dropout(tiny_cfg(data_dir, eager, steps=3, save_every=0)), log=lambda *_: None)
    pretrain(_no_dropout(tiny_cfg(data_dir, compiled, steps=3, save_every=0, compile=True)), log=notes.append)
    assert not [n for n in notes if "torch.compile" in str(n)]  # it compiled, no fallback note
    assert losses(compiled)[1] == pytest.approx(losses(eager)[1], rel=1e-4)
    assert losses(compiled, key="grad_norm")[1] == pytest.approx(losses(eager, key="grad_norm")[1], rel=1e-3)
    assert losses(compiled)[3] < losses(compiled)[1] + 0.5 and all(math.isfinite(v) for v in losses(compiled).values())


def test_compile_that_fails_at_its_first_call_falls_back_to_eager_before_training(data_dir, tmp_path, monkeypatch):
    """torch.compile is lazy: without a working compiler (a C++ compiler on the CPU, Triton on CUDA) it fails
    at the first call, which used to be the first training step. The loop tries a tiny compiled function
    first and trains eagerly, with a note, when it fails."""
    from lmforge.train import loop
    from lmforge.train.pretrain import pretrain

    def lazy_failing_compile(fn, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(loop.torch, "compile", lazy_failing_compile)
    notes = []
    run = tmp_path / "run"
    pretrain(tiny_cfg(data_dir, run, steps=2, save_every=0, compile=True), log=notes.append)
    assert any("torch.compile unavailable (RuntimeError: InvalidCxxCompiler" in str(n) and "eagerly" in str(n)
               for n in notes)
    assert sorted(losses(run)) == [1, 2]
