"""Serving throughput: aggregate generated tokens/s of `lmforge serve` at several client concurrencies, and
the ratio of concurrency 8 to concurrency 1 (continuous batching should make it well above 1; target >= 3).

    python -m bench.serve_throughput [--model CKPT] [--size llama-tiny|tiny|gpt2-124m] [--concurrency 1 2 4 8 16]
                                     [--requests 4] [--max-tokens 64] [--rounds 3] [--threads N]
                                     [--max-batch 8] [--no-batch-invariant] [--stream] [--compare-forward]
                                     [--compare-int8]

Without --model, a random-weight model of the named size is built with a byte-level BPE tokenizer (the
speed of a forward does not depend on the weights' values). The server runs in its own process on
127.0.0.1 (a free port); the load comes from this process: C client threads, each sending --requests
completions one after another (max_tokens fixed, ignore_eos, so every request generates the same number
of tokens). Rounds are interleaved (C=1, C=2, ..., then rotated) and the median per concurrency is
reported. All traffic stays on loopback and every request has a timeout.

The server decodes through the compiled step (lmforge.fused) where it applies. --compare-forward starts a
second server with it turned off (LMFORGE_FUSED_DECODE=0: every step through the model's forward), takes
turns between the two in every round, and prints the ratio per concurrency. --compare-int8 does the same
with a server of the same model under --quantize int8 (weight-only int8, also through the compiled step).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from .common import DATA_TEXT, machine, set_threads, table, verdict

SIZES = {  # preset and changes to it; the vocabulary is always the trained tokenizer's (1024)
    "tiny": ("llama-tiny", dict(n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, block_size=256)),
    "llama-tiny": ("llama-tiny", {}),  # the preset as it is (2.9M parameters)
    "gpt2-124m": ("gpt2-124m", {}),  # GPT-2 small's blocks (85M parameters) and a small vocabulary
}


def build_model(size: str, out: Path) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.models import build_model as build
    from lmforge.models.presets import get_preset
    from lmforge.tokenizer import Tokenizer

    text = DATA_TEXT.read_text(encoding="utf-8")[:200_000] if DATA_TEXT.is_file() else "To be, or not to be.\n" * 500
    tok = Tokenizer.train_from_iterator([text], "bpe", vocab_size=1024, min_frequency=2)
    preset, changes = SIZES[size]
    cfg = dataclasses.replace(get_preset(preset), vocab_size=tok.vocab_size, **changes)
    torch.manual_seed(0)
    return save_checkpoint(out, build(cfg), tokenizer=tok)


class Server:
    def __init__(self, model: Path, args: list[str], env: Optional[dict] = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.url, self.lines = None, []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.url is None and line.startswith("lmforge serve:"):
                    self.url = "http://" + line.split("http://", 1)[1].split("/", 1)[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or self.url is None:
            self.stop()
            raise SystemExit("server did not start:\n" + "".join(self.lines[-20:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def run_load(client, url: str, concurrency: int, requests: int, max_tokens: int, stream: bool, round_: int) -> float:
    """Aggregate completion tokens/s of ``concurrency`` clients sending ``requests`` requests each."""
    counted = []

    def one_client(c: int) -> None:
        for r in range(requests):
            body = {"prompt": f"ROMEO {c} {r}:", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
                    "seed": 1000 * round_ + 100 * c + r}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
                with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as resp:
                    usage = None
                    for line in resp.iter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            usage = json.loads(line[6:]).get("usage")
                    counted.append(usage["completion_tokens"])
            else:
                resp = client.post(url + "/v1/completions", json=body, timeout=300)
                resp.raise_for_status()
                counted.append(resp.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one_client, range(concurrency)))
    return sum(counted) / (time.perf_counter() - t0)


def main(argv: Optional[list[str]] = None) -> dict:
    """Runs the benchmark; returns {server kind: {concurrency: median tokens/s}}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint to serve (default: a random model of --size)")
    ap.add_argument("--size", default="llama-tiny", choices=sorted(SIZES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the server (0: all cores, max 8)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--no-batch-invariant", action="store_true")
    ap.add_argument("--stream", action="store_true", help="stream the answers (server-sent events)")
    ap.add_argument("--compare-int8", action="store_true",
                    help="also serve with --quantize int8 and print the ratio")
    ap.add_argument("--compare-forward", action="store_true",
                    help="also serve without the compiled step and print the ratio")
    args = ap.parse_args(argv)
    import httpx

    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(args.size, Path(tmp) / "model")
        limit = str(max(args.max_tokens, 16))
        flags = ["--threads", str(threads), "--max-batch", str(args.max_batch), "--max-tokens-limit", limit,
                 "--default-max-tokens", limit]
        if args.no_batch_invariant:
            flags.append("--no-batch-invariant")
        kinds = {"compiled step": ({}, [])}  # name: (environment, extra server flags)
        if args.compare_forward:
            kinds["model forward"] = ({"LMFORGE_FUSED_DECODE": "0"}, [])
        if args.compare_int8:
            kinds["int8"] = ({}, ["--quantize", "int8"])
        servers: dict[str, Server] = {}
        try:
            for kind, (env, extra) in kinds.items():
                servers[kind] = Server(model, flags + extra, env)
            limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
            with httpx.Client(limits=limits) as client:
                for server in servers.values():
                    run_load(client, server.url, 2, 1, 8, args.stream, 99)  # warm-up
                rates = {k: {c: [] for c in args.concurrency} for k in servers}
                order, names = list(args.concurrency), list(servers)
                for r in range(args.rounds):
                    for c in order[r % len(order):] + order[: r % len(order)]:
                        for k in names[r % len(names):] + names[: r % len(names)]:
                            rates[k][c].append(run_load(client, servers[k].url, c, args.requests, args.max_tokens,
                                                        args.stream, r))
                health = {k: client.get(s.url + "/health", timeout=30).json() for k, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    print(f"\nmachine: {machine()}")
    print(f"model: {args.model or args.size + ' (random weights)'}; server: {' '.join(flags)}; "
          f"{'streamed' if args.stream else 'non-streamed'} completions of {args.max_tokens} tokens, "
          f"{args.requests} per client per round, {args.rounds} rounds")
    med = {k: {c: statistics.median(v) for c, v in rates[k].items()} for k in rates}
    for k in med:
        h = health[k]
        print(f"\n{k}: the server reports compiled_step={h.get('compiled_step')}; tokens per decode step over "
              f"the run: {h['tokens'] / max(1, h['steps']):.2f}")
        base = med[k].get(1) or next(iter(med[k].values()))
        table(f"Aggregate throughput ({k})", ["concurrency", "tokens/s (median)", "rounds", "vs concurrency 1"],
              [[c, f"{m:.0f}", " ".join(f"{x:.0f}" for x in rates[k][c]), f"{m / base:.2f}x"]
               for c, m in med[k].items()])
    if "model forward" in med:
        table("Compiled step vs model forward", ["concurrency", "ratio of medians"],
              [[c, f"{med['compiled step'][c] / med['model forward'][c]:.2f}x"] for c in args.concurrency])
    if "int8" in med:
        table("int8 vs fp32 (both through the compiled step where it applies)",
              ["concurrency", "ratio of medians", "target"],
              [[c, f"{med['int8'][c] / med['compiled step'][c]:.2f}x",
                verdict(med["int8"][c] / med["compiled step"][c], 1.7)] for c in args.concurrency])
    ours = med["compiled step"]
    if 1 in ours and 8 in ours:
        ratio = ours[8] / ours[1]
        print(f"\nconcurrency 8 / concurrency 1 = {ratio:.2f}x (target >= 3): {verdict(ratio, 3.0)}")
    return med


if __name__ == "__main__":
    main()
