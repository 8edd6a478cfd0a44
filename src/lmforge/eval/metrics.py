"""Metrics that need no model: classification (accuracy, per-class precision/recall/F1, macro-F1, the
confusion matrix) and SQuAD answer matching (exact match and token F1 after SQuAD's normalization:
lowercase, no punctuation, no articles a/an/the, single spaces; Rajpurkar et al. 2016)."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], k: int) -> list[list[int]]:
    """m[i][j] = number of examples of true class i predicted as class j."""
    m = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        m[t][p] += 1
    return m


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (the unweighted mean of per-class F1, so rare classes count as much as common
    ones), per-class precision/recall/F1/support, the majority-class baseline and the confusion matrix."""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    k = len(labels)
    m = confusion_matrix(y_true, y_pred, k)
    n = len(y_true)
    per_class = {}
    f1s = []
    for c, name in enumerate(labels):
        tp = m[c][c]
        predicted = sum(m[r][c] for r in range(k))
        support = sum(m[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:  # a class absent from both truth and predictions does not count
            f1s.append(f1)
    correct = sum(m[c][c] for c in range(k))
    majority = max((sum(row) for row in m), default=0)
    return {"examples": n, "accuracy": correct / n if n else 0.0, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "majority_baseline": majority / n if n else 0.0, "labels": list(labels), "per_class": per_class,
            "confusion_matrix": m}


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalization."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-overlap F1 between normalized answers."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Mean exact match and F1 (each the best over an example's reference answers), in percent."""
    em = f1 = 0.0
    for pred, refs in zip(predictions, answers):
        em += max(exact_match(pred, r) for r in refs)
        f1 += max(f1_score(pred, r) for r in refs)
    n = len(predictions)
    return {"examples": n, "exact_match": 100 * em / n if n else 0.0, "f1": 100 * f1 / n if n else 0.0}
