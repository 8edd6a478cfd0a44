"""Where a classifier should read a causal model: linear probes on frozen hidden states at the text's last
token, at an appended end-of-sequence token, and at the end of a suffix (``finetune classify --suffix``).

    python -m bench.classify_probe --model CKPT --data train.jsonl [--train 240] [--test 160] [--max-len 64]
                                   [--suffix $'\\n\\nTopic:']

The first ``--train + --test`` texts of ``--data`` (.jsonl {"text", "label"} or label folders) are encoded
exactly as ``lmforge finetune classify`` encodes them (``finetune.data.encode_texts``); the hidden state
after the final norm is read where the classifier's head would read it. A logistic-regression probe
(standardized features, Adam, L2 1e-3, 300 steps) is fitted on the first ``--train`` and scored on the
rest. No weight of the model changes, so the accuracy says how much of the label the position already
holds. The BBC News figures in docs/finetuning.md come from this script on SmolLM2-135M.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .common import machine, set_threads, table


def features(model, tok, texts: list[str], max_len: int, suffix: str = "", eos: bool = False,
             batch: int = 16) -> torch.Tensor:
    from lmforge.finetune.data import ClassifyBatches, encode_texts

    ids = encode_texts(tok, texts, max_len - (1 if eos else 0), suffix)
    if eos:
        ids = [r + [tok.eos_id] for r in ids]
    out = []
    with torch.inference_mode():
        for b in ClassifyBatches(ids, [0] * len(ids), tok.pad_id if tok.pad_id is not None else 0).fixed_batches(batch):
            out.append(model.hidden(b["x"], b["lengths"]).float())
    return torch.cat(out)


def probe_accuracy(h: torch.Tensor, y: torch.Tensor, n_train: int, k: int, steps: int = 300) -> float:
    mu, sd = h[:n_train].mean(0), h[:n_train].std(0) + 1e-5
    z = (h - mu) / sd
    w = torch.zeros(h.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(z[:n_train] @ w + b, y[:n_train]) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((z[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--test", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--suffix", default="\n\nTopic:")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from lmforge.checkpoint import load_checkpoint
    from lmforge.finetune.classify import SequenceClassifier
    from lmforge.finetune.data import read_labeled

    set_threads(args.threads)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    examples = read_labeled(args.data)[: args.train + args.test]
    labels = sorted({e.label for e in examples})
    y = torch.tensor([labels.index(e.label) for e in examples])
    lm, tok, _ = load_checkpoint(args.model)
    model = SequenceClassifier(lm.eval(), len(labels))
    texts = [e.text for e in examples]
    rows = []
    for where, kw in (("last text token", {}), ("appended EOS", {"eos": True}),
                      (f"end of suffix {args.suffix!r}", {"suffix": args.suffix})):
        acc = probe_accuracy(features(model, tok, texts, args.max_len, **kw), y, args.train, len(labels))
        rows.append([where, f"{acc:.3f}"])
    majority = max((y[args.train:] == c).float().mean().item() for c in range(len(labels)))
    rows.append(["(majority class of the test texts)", f"{majority:.3f}"])
    table(f"Linear probes, {args.train} training / {len(examples) - args.train} test texts of {args.max_len} "
          f"tokens", ["head reads", "test accuracy"], rows)
    return rows


if __name__ == "__main__":
    main()
