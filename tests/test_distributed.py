"""Data-parallel training on CPU with gloo through torchrun: DDP and FSDP2 match one process with the
same global batch, and runs resume on another number of processes consuming every sample once."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import PrepareConfig, TokenizerConfig

TEXT = ("KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n\n") * 50

COMMON = ["--model.n-layers", "2", "--model.n-heads", "2", "--model.d-model", "32", "--model.block-size", "32",
          "--model.pos", "rope", "--model.norm", "rmsnorm", "--model.mlp", "swiglu", "--model.no-bias",
          "--optim.lr", "3e-3", "--optim.warmup-steps", "3", "--train.steps", "20", "--train.eval-every", "0",
          "--train.log-every", "1", "--train.save-every", "10", "--train.no-progress", "--train.no-plot",
          "--train.device", "cpu", "--train.trace-samples", "--train.seed", "3", "--train.threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dist")
    (root / "c.txt").write_text(TEXT)
    tok = Tokenizer.train(TokenizerConfig(input=[str(root / "c.txt")], kind="char", out=str(root / "tok")))
    tok.save(root / "tok")
    prepare(PrepareConfig(input=[str(root / "c.txt")], tokenizer=str(root / "tok"), out=str(root / "data"),
                          workers=1), progress=False)
    return root / "data"


def run(nproc: int, *args, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", "pretrain", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lmforge", "pretrain", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "train":
            out[e["step"]] = e["loss"]
    return out


def consumed(run_dir: Path) -> list[int]:
    ids = []
    for f in sorted(run_dir.glob("samples-rank*.jsonl")):
        for line in f.read_text().splitlines():
            ids.extend(json.loads(line)["indices"])
    return sorted(ids)


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, f"max loss difference {worst}"


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run(1, "--data", data_dir, "--out", out, "--train.batch-size", "8", *COMMON)
    return out


def test_ddp_equals_single_process(data_dir, single, tmp_path):
    out = tmp_path / "ddp"
    run(2, "--data", data_dir, "--out", out, "--train.batch-size", "4", "--train.parallel", "ddp", *COMMON)
    assert_close(losses(out), losses(single))
    assert consumed(out) == consumed(single) == list(range(20 * 8))
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "samples-rank1.jsonl").read_text() == (out / "samples-rank0.jsonl").read_text()


def test_fsdp_equals_single_process_and_consolidates(data_dir, single, tmp_path):
    out = tmp_path / "fsdp"
    run(2, "--data", data_dir, "--out", out, "--train.batch-size", "4", "--train.parallel", "fsdp", *COMMON)
    assert_close(losses(out), losses(single))
    assert (out / "checkpoints" / "step-000020" / "dcp").is_dir()  # sharded through DCP
    assert (out / "final" / "model.safetensors").is_file()  # gathered for export and generation
    from lmforge.checkpoint import load_checkpoint
    import torch

    a, _, _ = load_checkpoint(out / "final")
    b, _, _ = load_checkpoint(out / "checkpoints" / "step-000020")  # consolidated on load
    x = torch.randint(0, a.cfg.vocab_size, (2, 16))
    assert torch.equal(a(x), b(x))
    proc = subprocess.run([sys.executable, "-m", "lmforge", "consolidate", out / "checkpoints" / "step-000020",
                           "--out", tmp_path / "one"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one" / "model.safetensors").is_file()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_chunked_head_loss_under_ddp_and_fsdp_equals_the_plain_single_process(data_dir, single, tmp_path,
                                                                              parallel):
    # The tiny vocabulary normally takes the plain logits path; "always" forces the chunked head loss (and
    # the tied lookup's sparse gradient) into every process of the sharded or replicated run.
    out = tmp_path / parallel
    run(2, "--data", data_dir, "--out", out, "--train.batch-size", "4", "--train.parallel", parallel, *COMMON,
        env={"LMFORGE_FUSED_LOSS": "always"})
    assert_close(losses(out), losses(single))


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(data_dir, single, tmp_path, first, second):
    out = tmp_path / "run"

    def args(nproc):
        return ["--data", data_dir, "--out", out, "--train.batch-size", str(8 // nproc),
                "--train.parallel", "ddp" if nproc > 1 else "auto", *COMMON]

    run(first, *args(first), "--train.stop-after", "10")
    assert max(losses(out)) == 10
    run(second, *args(second), "--resume")
    assert_close(losses(out), losses(single))
    assert consumed(out) == list(range(20 * 8))  # every sample once, none replayed or skipped


def test_parallel_without_processes_is_a_clear_error(data_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", data_dir, "--out", tmp_path / "r",
                           "--train.parallel", "fsdp"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "torchrun" in proc.stderr.strip().splitlines()[-1]


def test_nccl_without_gpu_is_a_clear_error(data_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", data_dir, "--out", tmp_path / "r",
                           "--train.device", "cuda"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no GPU" in proc.stderr.strip().splitlines()[-1]


def test_a_dead_rank_ends_the_run_instead_of_hanging(data_dir, tmp_path):
    """Rank 1 dies hard mid-run; torchrun must stop rank 0 and fail within bounded time."""
    import time

    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys\n"
        "import lmforge.train.pretrain as pt\n"
        "from lmforge.cli import main\n"
        "real, n = pt.causal_lm_loss, [0]\n"
        "def dying(model, batch):\n"
        "    n[0] += 1\n"
        "    if os.environ['RANK'] == '1' and n[0] == 5:\n"
        "        os._exit(3)\n"
        "    return real(model, batch)\n"
        "pt.causal_lm_loss = dying\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                           "--train.batch-size", "4", "--train.parallel", "ddp", "--train.dist-timeout-s", "30",
                           *COMMON], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    assert time.time() - t0 < 200
    assert "exitcode" in proc.stderr or "failed" in proc.stderr.lower()


@pytest.fixture(scope="module")
def base_ckpt(data_dir, tmp_path_factory) -> Path:
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(data_dir)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layers=2, n_heads=2, d_model=32,
                                  pos="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    return save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", model, tokenizer=tok)


FT_COMMON = ["--train.steps", "6", "--train.eval-every", "0", "--train.log-every", "1", "--train.save-every", "0",
             "--train.no-progress", "--train.no-plot", "--train.device", "cpu", "--train.trace-samples",
             "--train.threads", "1", "--lora.rank", "4", "--max-len", "48", "--optim.warmup-steps", "1"]


def finetune(nproc: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lmforge", "finetune", *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lmforge", "finetune", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lora_classification_and_sft_under_ddp(base_ckpt, tmp_path):
    rows = [{"text": ("winter discontent " if i % 2 else "summer sun of york ") * (1 + i % 3),
             "label": "cold" if i % 2 else "warm"} for i in range(64)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", base_ckpt, "--data", tmp_path / "cls.jsonl", *FT_COMMON]
    finetune(1, "classify", "--out", tmp_path / "one", "--train.batch-size", "4", *common)
    finetune(2, "classify", "--out", tmp_path / "two", "--train.batch-size", "2", "--train.parallel", "ddp", *common)
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert consumed(tmp_path / "two") == consumed(tmp_path / "one") == list(range(6 * 4))
    assert (tmp_path / "two" / "final" / "adapter.safetensors").is_file()

    chats = [{"messages": [{"role": "user", "content": f"who is the king {i}?"},
                           {"role": "assistant", "content": "Richard of York."}]} for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    finetune(2, "sft", "--model", base_ckpt, "--data", tmp_path / "sft.jsonl", "--out", tmp_path / "sft",
             "--train.batch-size", "2", "--train.parallel", "ddp", *FT_COMMON[:-4], "--lora.rank", "4")
    traced = [sorted(json.loads(x)["indices"] for x in (tmp_path / "sft" / f"samples-rank{r}.jsonl")
                     .read_text().splitlines()) for r in (0, 1)]
    flat0 = {i for b in traced[0] for i in b}
    flat1 = {i for b in traced[1] for i in b}
    assert flat0 and flat1 and not flat0 & flat1  # disjoint slices per rank
    assert (tmp_path / "sft" / "final" / "adapter.safetensors").is_file()
    assert all(math.isfinite(v) for v in losses(tmp_path / "sft").values())
