"""Generation metrics against references: BLEU and chrF through ``sacrebleu`` (Post 2018), ROUGE-1/2/L through
Google's ``rouge-score`` (the reference implementation of Lin 2004). lmforge computes none of them itself:
a hand-written BLEU never quite matches the published one, and sacrebleu's numbers are the comparable ones.

    bleu(hyps, refs)    corpus BLEU, sacrebleu defaults (13a tokenization, exp smoothing); for Chinese,
                        Japanese or Korean references the matching sacrebleu tokenizer ("zh", "ja-mecab"
                        needs extra packages, so Japanese and Korean use "char") is chosen automatically
    chrf(hyps, refs)    corpus chrF (character 6-grams, beta 2)
    rouge(hyps, refs)   mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L, with the Porter stemmer; CJK text is scored
                        per character (rouge-score's default tokenizer drops non-Latin characters)

All scores are on a 0-100 scale. ``refs`` is one reference string per hypothesis, or a list of references
per hypothesis. ``evaluate_seq2seq`` generates with a seq2seq model and scores the outputs; it is what
``lmforge evaluate --task bleu|chrf|rouge`` runs.
"""
from __future__ import annotations

import unicodedata
from typing import Optional, Sequence, Union

from ..config import UserError

Refs = Sequence[Union[str, Sequence[str]]]
TEXT_TASKS = ("bleu", "chrf", "rouge")


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this metric needs the {package!r} package: pip install {package} "
                        f"(or pip install 'lmforge[eval]')") from None


def _ref_lists(hyps: Sequence[str], refs: Refs) -> list[list[str]]:
    """Per-hypothesis reference lists."""
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} outputs but {len(refs)} references; give one reference (list) per output")
    if not hyps:
        raise UserError("nothing to score: no outputs")
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def _streams(ref_lists: list[list[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference index (every hypothesis needs the same count)."""
    k = max(len(r) for r in ref_lists)
    if any(len(r) != k for r in ref_lists):
        raise UserError("every output needs the same number of references for BLEU/chrF")
    return [[r[i] for r in ref_lists] for i in range(k)]


def _cjk_share(texts: Sequence[str]) -> dict[str, float]:
    counts = {"zh": 0, "ja": 0, "ko": 0}
    total = 0
    for t in texts:
        for ch in t:
            if ch.isspace():
                continue
            total += 1
            name = unicodedata.name(ch, "")
            if name.startswith("CJK UNIFIED"):
                counts["zh"] += 1
            elif name.startswith(("HIRAGANA", "KATAKANA")):
                counts["ja"] += 1
            elif name.startswith("HANGUL"):
                counts["ko"] += 1
    return {k: v / max(total, 1) for k, v in counts.items()}


def auto_tokenize(refs: Sequence[str]) -> str:
    """sacrebleu tokenizer for these references: "zh" for Chinese, "char" for Japanese and Korean, else "13a"."""
    share = _cjk_share(refs[:2000])
    if share["ja"] > 0.05 or share["ko"] > 0.3:
        return "char"
    if share["zh"] > 0.3:
        return "zh"
    return "13a"


def bleu(hyps: Sequence[str], refs: Refs, tokenize: Optional[str] = None) -> float:
    """Corpus BLEU (0-100) with sacrebleu; ``tokenize=None`` picks the tokenizer from the references."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    ref_lists = _ref_lists(hyps, refs)
    tok = tokenize or auto_tokenize([r[0] for r in ref_lists])
    return float(sacrebleu.corpus_bleu(list(hyps), _streams(ref_lists), tokenize=tok).score)


def chrf(hyps: Sequence[str], refs: Refs) -> float:
    """Corpus chrF (0-100) with sacrebleu's defaults."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    ref_lists = _ref_lists(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), _streams(ref_lists)).score)


def _is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL"))


class _CharTokenizer:
    """rouge-score tokenizer for CJK text: every CJK character is a token, Latin words and numbers stay
    whole, punctuation is dropped (as rouge-score's own tokenizer drops it)."""

    def tokenize(self, text: str) -> list[str]:
        out, word = [], ""
        for ch in text.lower():
            if ch.isalnum() and not _is_cjk(ch):
                word += ch
                continue
            if word:
                out.append(word)
                word = ""
            if _is_cjk(ch) and ch.isalnum():
                out.append(ch)
        if word:
            out.append(word)
        return out


def rouge(hyps: Sequence[str], refs: Refs) -> dict[str, float]:
    """Mean F1 (0-100) of ROUGE-1, ROUGE-2 and ROUGE-L; with several references, the best per output."""
    _require("nltk", "rouge-score")
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    ref_lists = _ref_lists(hyps, refs)
    cjk = sum(_cjk_share([r[0] for r in ref_lists[:2000]]).values()) > 0.3
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=not cjk,
                                      tokenizer=_CharTokenizer() if cjk else None)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, rs in zip(hyps, ref_lists):
        scores = [scorer.score(r, h) for r in rs]
        for k in sums:
            sums[k] += max(s[k].fmeasure for s in scores)
    return {k: 100.0 * v / len(hyps) for k, v in sums.items()}


def text_scores(hyps: Sequence[str], refs: Refs) -> dict[str, float]:
    """BLEU, chrF and ROUGE-1/2/L of the outputs, rounded to 2 decimals."""
    out = {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), **rouge(hyps, refs)}
    return {k: round(v, 2) for k, v in out.items()}


def evaluate_seq2seq(model_path: str, data: str, task: str = "bleu", *, max_examples: int = 0, batch_size: int = 16,
                     gen=None, source_field: str = "source", target_field: str = "target", device: str = "cpu",
                     progress: bool = True) -> dict:
    """Generate outputs for the sources of a .jsonl of pairs with a seq2seq model and score them against the
    targets: task "bleu", "chrf" or "rouge" (all three are reported; ``task`` names the headline score)."""
    from ..config import Seq2SeqGenerateConfig
    from ..finetune.seq2seq import read_pairs
    from ..seq2seq_generate import load_seq2seq, translate_texts

    if task not in TEXT_TASKS:
        raise UserError(f"task: expected one of {', '.join(TEXT_TASKS)}, got {task!r}")
    pairs = read_pairs(data, source_field, target_field)
    if max_examples:
        pairs = pairs[:max_examples]
    model, src_tok, tgt_tok, _meta = load_seq2seq(model_path, device=device)
    gen = gen or Seq2SeqGenerateConfig(num_beams=4, length_penalty=0.6)
    srcs, refs = [s for s, _ in pairs], [t for _, t in pairs]
    hyps = translate_texts(model, src_tok, tgt_tok, srcs, gen, batch_size=batch_size, progress=progress)
    scores = text_scores(hyps, refs)
    headline = {"bleu": "bleu", "chrf": "chrf", "rouge": "rougeL"}[task]
    return {"task": task, "score": scores[headline], **scores, "examples": len(pairs),
            "copy_source_baseline": text_scores(srcs, refs),
            "samples": [{"source": s, "reference": r, "output": h} for s, r, h in list(zip(srcs, refs, hyps))[:10]]}


def format_text_scores(r: dict) -> str:
    """A table of an ``evaluate_seq2seq`` result: each metric for the model and the copy-the-source baseline."""
    from .report import table

    base = r.get("copy_source_baseline", {})
    rows = [[k, r[k], base.get(k, float("nan"))] for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")]
    return table(rows + [["examples", r["examples"], ""]], ["metric", "model", "copy source"])
