"""The command line end to end, and its promise for user mistakes: one clear line, exit status 2,
no traceback, nothing half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n") * 40


def lmforge(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    # Progress bars may have been drawn before the mistake was found; the message is one final line.
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and lines[-1].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """corpus -> char tokenizer -> prepared data -> a 30-step run, all through the CLI."""
    ws = tmp_path_factory.mktemp("cli")
    (ws / "corpus.txt").write_text(TEXT, encoding="utf-8")
    p = lmforge("tokenizer", "train", "--input", ws / "corpus.txt", "--kind", "char", "--out", ws / "tok")
    assert p.returncode == 0, p.stderr
    p = lmforge("prepare", "--input", ws / "corpus.txt", "--tokenizer", ws / "tok", "--out", ws / "data",
                "--workers", "1")
    assert p.returncode == 0, p.stderr
    p = lmforge("pretrain", "--preset", "char-tiny", "--data", ws / "data", "--out", ws / "run",
                "--model.n-layers", "2", "--model.d-model", "64", "--train.steps", "30", "--train.eval-every", "10",
                "--train.eval-batches", "2", "--train.batch-size", "8", "--optim.lr", "3e-3",
                "--optim.warmup-steps", "5", "--train.no-progress")
    assert p.returncode == 0, p.stderr
    return ws


def test_pipeline_writes_a_run(workspace):
    run = workspace / "run"
    for name in ("run.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors", "final/tokenizer.json"):
        assert (run / name).exists(), name
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if e["event"] == "train"]
    assert train[-1] < train[0]
    assert any(e["event"] == "val" for e in events)
    assert all("tokens_per_s" in e for e in events if e["event"] == "train")


def test_generate_greedy_is_deterministic(workspace):
    a = lmforge("generate", workspace / "run", "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20")
    b = lmforge("generate", workspace / "run", "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:")
    assert len(a.stdout) > len("ROMEO:\n")  # it generated something


def test_resume_from_cli_uses_run_yaml(workspace, tmp_path):
    """`lmforge pretrain --out RUN --resume --train.steps N` needs no other flag: run.yaml supplies them."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    p = lmforge("pretrain", "--out", run, "--resume", "--train.steps", "35", "--train.no-progress")
    assert p.returncode == 0, p.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 35


def test_help_documents_flags():
    p = lmforge("pretrain", "--help")
    assert p.returncode == 0
    assert "--train.batch-size" in p.stdout and "Sequences per micro-batch" in p.stdout
    assert "--optim.lr" in p.stdout and "--model.n-kv-heads" in p.stdout


def test_unknown_preset(tmp_path):
    assert_user_error(lmforge("pretrain", "--preset", "gpt9", "--data", tmp_path, "--out", tmp_path / "r"),
                      "unknown preset", "gpt9", "char-tiny")


def test_missing_corpus(tmp_path):
    assert_user_error(lmforge("tokenizer", "train", "--input", tmp_path / "nope.txt", "--out", tmp_path / "t"),
                      "nope.txt")
    assert not (tmp_path / "t").exists()


def test_empty_corpus(workspace, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(lmforge("prepare", "--input", tmp_path / "empty.txt", "--tokenizer", workspace / "tok",
                              "--out", tmp_path / "d"), "empty")
    assert not (tmp_path / "d").exists()


def test_undecodable_bytes_name_file_and_offset(workspace, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ROMEO: good text\n" * 3 + b"\xff\xfe broken")
    p = lmforge("prepare", "--input", bad, "--tokenizer", workspace / "tok", "--out", tmp_path / "d")
    assert_user_error(p, "bad.txt", "51")  # the first bad byte's offset
    assert not (tmp_path / "d").exists()
    p = lmforge("prepare", "--input", bad, "--tokenizer", workspace / "tok", "--out", tmp_path / "d",
                "--errors", "replace", "--workers", "1")
    assert p.returncode == 0, p.stderr


def test_vocab_size_too_small(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    assert_user_error(lmforge("tokenizer", "train", "--input", tmp_path / "c.txt", "--kind", "bpe",
                              "--vocab-size", "10", "--out", tmp_path / "t"), "vocab_size")


def test_block_size_beyond_positions(workspace, tmp_path):
    assert_user_error(lmforge("pretrain", "--preset", "char-tiny", "--data", workspace / "data", "--out",
                              tmp_path / "r", "--train.block-size", "128"), "train.block_size", "beyond")
    assert not (tmp_path / "r").exists()


def test_bad_config_value_names_field(workspace, tmp_path):
    assert_user_error(lmforge("pretrain", "--data", workspace / "data", "--out", tmp_path / "r",
                              "--model.n-heads", "3", "--model.d-model", "64"), "model.n_heads")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    assert_user_error(lmforge("pretrain", "--config", cfg, "--data", workspace / "data", "--out", tmp_path / "r"),
                      "train.stepz", "unknown field")


def test_checkpoint_config_mismatch(workspace, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "run" / "final", ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["d_model"] = 96
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert_user_error(lmforge("generate", ckpt, "--prompt", "x"), "weights do not match")


def test_model_not_found(tmp_path):
    assert_user_error(lmforge("generate", tmp_path / "missing", "--prompt", "x"), "not found")


def test_unwritable_output(workspace, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = lmforge("prepare", "--input", workspace / "corpus.txt", "--tokenizer", workspace / "tok",
                "--out", blocker / "d")
    assert_user_error(p)
