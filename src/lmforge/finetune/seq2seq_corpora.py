"""Real source -> target pairs that install from PyPI alone (see ../shared/DATA.md), written as the .jsonl that
`lmforge finetune seq2seq` reads:

    python -m lmforge.finetune.seq2seq_corpora en-zh --out ~/.cache/lmforge/pairs/en-zh.jsonl
    python -m lmforge.finetune.seq2seq_corpora xsum  --out ~/.cache/lmforge/pairs/xsum.jsonl

Both come from the BIG-bench sdist (``bigbench==1.0.0`` on PyPI, 358 MB, read as files, never installed):

    en-zh   multiemo/all_sentence_en and all_sentence_zh, aligned index by index: 57,466 review sentences
            (machine translations of the Polish MultiEmo corpus); exact duplicate English sentences are
            dropped so that no held-out sentence was seen in training
    xsum    gem/xsum: 1,001 BBC articles, each with its one-sentence summary (Narayan et al. 2018)

The sdist declares a dependency by direct URL, which makes ``pip download`` stop after unpacking it; with
``--no-clean`` the unpacked tree stays, and the few task.json files needed are copied into
~/.cache/lmforge/bigbench/ (once).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = {"en-zh": ["multiemo/all_sentence_en", "multiemo/all_sentence_zh"], "xsum": ["gem/xsum"]}


def _cache() -> Path:
    from ..data.corpora import get_cache_dir

    return get_cache_dir() / "bigbench"


def fetch_bigbench(tasks: list[str]) -> Path:
    """The cache directory holding ``<task>/task.json`` for every task, downloading the sdist if needed."""
    root = _cache()
    if all((root / t / "task.json").is_file() for t in tasks):
        return root
    tmp = Path(tempfile.mkdtemp(prefix="bigbench-"))
    try:
        env = dict(os.environ, TMPDIR=str(tmp))
        print("downloading bigbench==1.0.0 from PyPI (358 MB, once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--quiet",
                        "--disable-pip-version-check", "-d", str(tmp / "dl"), "bigbench==1.0.0"],
                       env=env, capture_output=True, text=True, timeout=1800)
        found = sorted(tmp.glob("pip-*/**/bigbench/benchmark_tasks"))
        if not found:
            raise SystemExit("error: could not download bigbench==1.0.0 from PyPI (no unpacked sdist found)")
        for t in tasks:
            (root / t).mkdir(parents=True, exist_ok=True)
            shutil.copy(found[0] / t / "task.json", root / t / "task.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _examples(root: Path, task: str) -> list[dict]:
    return json.loads((root / task / "task.json").read_text(encoding="utf-8"))["examples"]


def en_zh_pairs(root: Path) -> list[dict]:
    en, zh = _examples(root, "multiemo/all_sentence_en"), _examples(root, "multiemo/all_sentence_zh")
    if len(en) != len(zh):
        raise SystemExit(f"error: multiemo en/zh differ in length ({len(en)} vs {len(zh)})")
    seen, out = set(), []
    for a, b in zip(en, zh):
        s, t = a["input"].strip(), b["input"].strip()
        if s and t and s not in seen:
            seen.add(s)
            out.append({"source": s, "target": t})
    return out


def xsum_pairs(root: Path) -> list[dict]:
    return [{"source": " ".join(e["input"].split()), "target": e["target"].strip()} for e in _examples(root, "gem/xsum")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmforge.finetune.seq2seq_corpora", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", choices=sorted(TASKS))
    ap.add_argument("--out", required=True, help="output .jsonl of {source, target} pairs")
    args = ap.parse_args(argv)
    root = fetch_bigbench(TASKS[args.corpus])
    pairs = en_zh_pairs(root) if args.corpus == "en-zh" else xsum_pairs(root)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"{len(pairs):,} pairs written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
