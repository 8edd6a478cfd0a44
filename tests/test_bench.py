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


def test_interleave_pairs_a_measurement_with_each_timed_round():
    calls, samples = [], {}
    common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1,
                      before={"b": lambda: calls.append("before b")}, samples=samples)
    # warm-up a, b (no hook); round 1: a, before b, b; round 2 (rotated): before b, b, a
    assert calls == ["a", "b", "a", "before b", "b", "before b", "b", "a"]
    assert set(samples) == {"a", "b"} and all(len(v) == 2 and min(v) >= 0 for v in samples.values())


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

    rows = train_step.main(["--config", "tiny", "--rounds", "1", "--reps", "1", "--threads", "1", "--profile"])
    out = capsys.readouterr().out
    assert "tiny gpt2: lmforge vs transformers" in out and "MFU" in out
    from lmforge.kernels import kernel_available

    assert ("of the FMA-loop peak" in out) == kernel_available()
    assert "Where lmforge's step goes" in out and any(k in out for k in ("aten::mm", "aten::addmm", "mkldnn::"))
    assert any(r[0] == "tiny nanogpt: lmforge" for r in rows)
    # A configuration of one's own (--shape): the char one with entries changed, both architectures.
    # A vocabulary large enough for the chunked head loss, against the plain path (--compare-loss).
    from lmforge.models import head_loss

    rows = train_step.main(["--shape", "vocab_size=12000,n_layers=1,n_heads=2,d_model=32,block_size=24,batch=2",
                            "--rounds", "1", "--reps", "1", "--threads", "1", "--compare-loss", "--compare-linear"])
    out = capsys.readouterr().out
    assert "custom: vocab_size=12000, block_size=24, n_layers=1, n_heads=2, d_model=32, batch=2" in out
    assert {"custom nanogpt: lmforge", "custom gpt2: transformers", "custom gpt2: lmforge, LMFORGE_FUSED_LOSS=0",
            "custom gpt2: lmforge, LMFORGE_FUSED_LOSS=0 vs transformers",
            "custom gpt2: lmforge, LMFORGE_ONEDNN_LINEAR=0"} <= {r[0] for r in rows}
    assert head_loss.enabled  # the plain candidates' switches are put back
    from lmforge import kernels

    assert kernels.onednn_linear_available() == kernels._onednn_check()


def test_shape_argument_changes_known_integer_entries_only():
    import argparse

    parse = common.shape_arg({"n_layers": 4, "d_model": 128})
    assert parse("n_layers=2, d_model=64") == {"n_layers": 2, "d_model": 64}
    assert parse("") == {"n_layers": 4, "d_model": 128}
    for bad, why in (("heads=2", "key one of"), ("n_layers=two", "not an integer"), ("n_layers", "key=value"),
                     ("d_model=0", "at least 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            parse(bad)


def test_gpu_bench_dry_run(capsys):
    pytest.importorskip("transformers")
    from bench import gpu

    rows = gpu.main(["--dry-run", "--skip-ttq"])
    assert "dry run" in rows[0][0] and "MFU" in rows[0][2]


def test_prepare_speed_bench_smoke(capsys, shakespeare_path):  # its synthetic corpus is made of tinyshakespeare
    pytest.importorskip("psutil")
    from bench import prepare_speed

    rows = prepare_speed.main(["--mb", "1", "--vocab", "300"])
    out = capsys.readouterr().out
    assert "MB/s per core" in out and "process tree PSS" in out
    pss = float(rows[2][1].split()[0])
    assert 10 < pss < 4096  # a real sample of the child's tree was taken


def test_prepare_speed_bench_on_a_text_file(tmp_path, shakespeare_text, capsys):
    pytest.importorskip("psutil")
    from bench import prepare_speed

    corpus = tmp_path / "plays.txt"
    corpus.write_text(shakespeare_text[:400_000], encoding="utf-8")
    rows = prepare_speed.main(["--corpus", str(corpus), "--vocab", "300"])
    assert "plays.txt" in capsys.readouterr().out
    assert float(rows[4][1]) > 0 and float(rows[5][1]) > 0 and rows[5][2].startswith("lmforge ")


def test_gemv_bench_smoke(capsys):
    from bench import gemv
    from lmforge.packed import packing_available

    if not packing_available():
        pytest.skip("no oneDNN fp32 inner product in this torch build")
    rows = gemv.main(["--scale", "0.05", "--rounds", "1", "--rows", "1"])
    assert len(rows) == 5 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert "packed GB/s" in capsys.readouterr().out


def test_classify_probe_bench_smoke(tmp_path, capsys):
    import json

    import torch

    from bench import classify_probe
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.models import build_model
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["abcdefghij klmnopqrst: \n"], kind="char")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok)
    rows = [{"text": ("abc " if i % 2 else "klm ") * 3, "label": "ab" if i % 2 else "kl"} for i in range(24)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = classify_probe.main(["--model", str(ckpt), "--data", str(tmp_path / "d.jsonl"), "--train", "16",
                               "--test", "8", "--max-len", "16", "--suffix", ": "])
    assert [r[0] for r in out][:2] == ["last text token", "appended EOS"]
    assert float(out[0][1]) == 1.0  # the two classes differ at the last token: a probe separates them
    assert "Linear probes" in capsys.readouterr().out


def test_activations_bench_smoke(capsys):
    from bench import activations
    from lmforge.kernels import kernel_available

    if not kernel_available():
        pytest.skip("lmforge's CPU kernels could not be built")
    rows = activations.main(["--rows", "16", "--cols", "32", "--rounds", "1", "--attention", "--weight-grad"])
    assert rows[-1][2].endswith("x faster") and float(rows[0][1]) >= 0
    assert "GELU on a 16x32" in capsys.readouterr().out
    rows = activations.main(["--rows", "16", "--cols", "32", "--rounds", "1", "--attention", "1x2x8x16",
                             "--weight-grad"])
    assert rows[-1][0] == "1x2x8x16" and rows[-1][3].endswith("x")
    assert "Causal attention forward + backward" in capsys.readouterr().out
    rows = activations.main(["--rows", "16", "--cols", "32", "--rounds", "1", "--attention", "--weight-grad",
                             "40x48x24"])
    from lmforge.kernels import onednn_linear_available

    if onednn_linear_available():
        assert rows[-1][0] == "40x48x24" and rows[-1][-1].endswith("x")
        assert "Linear weight gradient" in capsys.readouterr().out


def test_serve_throughput_bench_smoke(capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from bench import serve_throughput
    from lmforge.kernels import kernel_available

    med = serve_throughput.main(["--size", "tiny", "--concurrency", "1", "2", "--requests", "1", "--max-tokens", "8",
                                 "--rounds", "1", "--compare-forward", "--compare-int8"])
    assert set(med) == {"compiled step", "model forward", "int8"}
    assert all(v > 0 for m in med.values() for v in m.values())
    out = capsys.readouterr().out
    assert f"compiled step: the server reports compiled_step={kernel_available()}" in out
    assert "model forward: the server reports compiled_step=False" in out
    assert "Compiled step vs model forward" in out and "int8 vs fp32" in out
    assert f"int8: the server reports compiled_step={kernel_available()}" in out


def test_read_bandwidths_are_measured():
    from lmforge.kernels import kernel_available

    assert common.stream_bandwidth(8, rounds=1) > 0
    got = common.kernel_read_bandwidth(8, rounds=1)
    assert (got is not None and got > 0) if kernel_available() else got is None


@pytest.mark.slow
@pytest.mark.parametrize("arch,preset", [("gpt2", "gpt2-124m"), ("llama", "llama-160m")])
def test_decode_bench_on_a_shape_of_ones_own(capsys, arch, preset):
    from bench import decode

    out = decode.main(["--shape", "n_layers=2,n_heads=2,d_model=64,vocab_size=300,block_size=128", "--rounds", "1",
                       "--new-tokens", "8", "--prompt-tokens", "8", "--batch", "2", "--threads", "1",
                       "--arch", arch])
    text = capsys.readouterr().out
    assert f"{preset} with n_layers=2,n_heads=2,d_model=64,vocab_size=300,block_size=128," in text
    assert out["same"] and out["bandwidth"] > 0
    for key in ("fp32", "int8"):  # one bandwidth per timed round (1 here), the faster of the two readings
        (best, summed, kernel), = out["paired_bandwidth"][key]
        assert best == max(summed, kernel) > 0
    assert out["fp32_vs_bound"] > 0 and out["int8_vs_bound"] > 0
    assert "each round against its own bound" in text


def test_time_to_quality_bench_runs_nanogpt_and_lmforge_side_by_side(capsys, tmp_path):
    """The time-to-quality bench end to end at tiny step counts, with a stand-in for a nanoGPT checkout
    (a train.py that records its command line and prints a validation loss): nanoGPT's data files are
    written in its format, its README command runs, and lmforge pretrain runs nanoGPT's setting beside it."""
    import pickle

    import numpy as np

    from bench import time_to_quality

    repo = tmp_path / "nanoGPT"
    (repo / "data" / "shakespeare_char").mkdir(parents=True)
    (repo / "train.py").write_text(
        "import sys, pathlib\n"
        "pathlib.Path('argv.txt').write_text(' '.join(sys.argv[1:]))\n"
        "print('step 20: train loss 2.5000, val loss 2.6000')\n", encoding="utf-8")
    rows = time_to_quality.main(["--baseline-steps", "20", "--recipe-steps", "5", "--threads", "1",
                                 "--nanogpt", str(repo)])
    out = capsys.readouterr().out
    argv = (repo / "argv.txt").read_text(encoding="utf-8")
    assert "config/train_shakespeare_char.py" in argv and "--device=cpu" in argv and "--max_iters=20" in argv
    meta = pickle.loads((repo / "data" / "shakespeare_char" / "meta.pkl").read_bytes())
    train_ids = np.fromfile(repo / "data" / "shakespeare_char" / "train.bin", dtype=np.uint16)
    assert train_ids.max() < meta["vocab_size"] and len(train_ids) > 900_000
    names = [r[0] for r in rows]
    assert names[0].startswith("reference loop") and names[1].startswith("nanoGPT train.py")
    assert rows[1][2] == "2.6000"  # nanoGPT's own printed validation loss
    same = rows[2]
    assert same[0].startswith("lmforge pretrain, the same setting") and "x nanoGPT's speed" in same[4]
    assert 0 < float(same[2]) < 5  # lmforge's own last validation loss, read from its output
    assert "lmforge shakespeare-char-cpu.yaml (5 steps" in names[3]
    assert "Time to quality" in out
