"""Evaluation: classification metrics, SQuAD exact match / F1, perplexity and bits per byte, and the
`lmforge evaluate` command (table on stdout, JSON file)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.eval.metrics import classification_report, exact_match, f1_score, normalize_answer, squad_scores
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. é ü 你好\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator([TEXT * 3 + "abcdefghijklmnopqrstuvwxyz?:CQA"], kind="char")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False)
    path = tmp_path_factory.mktemp("m") / "ckpt"
    save_checkpoint(path, build_model(cfg), tokenizer=tok)
    return path


def test_classification_report_by_hand():
    labels = ["a", "b", "c"]
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    r = classification_report(y_true, y_pred, labels)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    # per class: a P=1 R=2/3 F1=0.8; b P=1/2 R=1/2 F1=0.5; c P=1/2 R=1 F1=2/3
    assert r["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert r["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert r["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["majority_baseline"] == pytest.approx(0.5)


def test_squad_normalization_em_and_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert f1_score("Paris, France", "Paris") == pytest.approx(2 * (1 / 2 * 1) / (1 / 2 + 1))
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    s = squad_scores(["Paris", "blue whale", "no"], [["paris", "Paris, France"], ["the blue whale"], ["yes"]])
    assert s["exact_match"] == pytest.approx(200 / 3) and s["f1"] == pytest.approx(200 / 3)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tok, ckpt):
    from lmforge.checkpoint import load_checkpoint
    from lmforge.eval.perplexity import perplexity

    model, _, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next token equally likely
    docs = [TEXT * 3, "fox"]
    r = perplexity(model, tok, docs, max_len=16, batch_size=3)
    V = model.cfg.vocab_size
    assert r["perplexity"] == pytest.approx(V, rel=1e-4)
    n_tokens = sum(len(tok.encode(d)) for d in docs)  # EOS precedes each document, so every token is scored
    assert r["tokens"] == n_tokens
    assert r["bits_per_byte"] == pytest.approx(n_tokens * math.log2(V) / sum(len(d.encode()) for d in docs))


def test_perplexity_matches_lm_api_within_one_window(tok, ckpt):
    from lmforge.eval.perplexity import perplexity
    from lmforge.lm import LM

    lm = LM.load(ckpt)
    text = TEXT[:25]
    r = perplexity(lm.model, tok, [text], batch_size=1)
    # LM.perplexity scores tokens 2..n given token 1; ours also scores token 1 given EOS: compare both ways.
    ids = [tok.eos_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0], -1)
    nll = -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert r["nll_per_token"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_evaluate_command_writes_json_and_a_table(tmp_path, tok, ckpt, capsys):
    from lmforge.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": TEXT[::-1]}) + "\n")
    out = tmp_path / "r.json"
    assert main(["evaluate", str(ckpt), "--task", "perplexity", "--data", str(data), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "bits per byte" in shown and "perplexity" in shown
    r = json.loads(out.read_text())
    assert r["task"] == "perplexity" and r["documents"] == 2 and r["bits_per_byte"] > 0

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "fox?", "context": "the quick brown fox", "answers": ["fox"]}) + "\n" +
                  json.dumps({"messages": [{"role": "user", "content": "dog?"},
                                           {"role": "assistant", "content": "dog"}]}) + "\n")
    assert main(["evaluate", str(ckpt), "--task", "squad", "--data", str(qa), "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["examples"] == 2 and 0 <= r["exact_match"] <= 100 and 0 <= r["f1"] <= 100
    assert "exact match" in capsys.readouterr().out


def test_squad_v11_json(tmp_path):
    from lmforge.eval.run import read_qa

    f = tmp_path / "dev.json"
    f.write_text(json.dumps({"data": [{"paragraphs": [{"context": "C", "qas": [
        {"question": "Q?", "answers": [{"text": "A1"}, {"text": "A2"}]}]}]}]}))
    assert read_qa(f) == [{"question": "Q?", "context": "C", "answers": ["A1", "A2"]}]


def test_evaluate_mistakes(tmp_path, ckpt, capsys):
    from lmforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    for args, pattern in ((["--task", "perplexity", "--data", str(bad)], "bad.jsonl line 2: not valid JSON"),
                          (["--task", "classify", "--data", str(bad)], "is not a classifier"),
                          (["--task", "perplexity", "--data", str(tmp_path / "none.txt")], "data not found")):
        assert main(["evaluate", str(ckpt), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


def test_classify_evaluation_reports_unknown_labels(tmp_path, tok, ckpt, capsys):
    from lmforge.cli import main
    from lmforge.finetune.classify import SequenceClassifier
    from lmforge.checkpoint import load_checkpoint, clean_state_dict

    lm, _, _ = load_checkpoint(ckpt)
    clf = SequenceClassifier(lm, 2)
    state = clean_state_dict(lm)
    state.update({"cls_head." + k: v for k, v in clf.cls_head.state_dict().items()})
    save_checkpoint(tmp_path / "clf", lm, tokenizer=tok, state_dict=state,
                    extra={"task": "classify", "labels": ["x", "y"], "max_len": 16})
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the fox", "label": "x"}\n{"text": "the dog", "label": "y"}\n')
    out = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path / "clf"), "--task", "classify", "--data", str(data), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["examples"] == 2 and len(r["confusion_matrix"]) == 2 and "macro_f1" in r
    assert "confusion matrix" in capsys.readouterr().out
    data.write_text('{"text": "the fox", "label": "x"}\n{"text": "the dog", "label": "z"}\n')
    assert main(["evaluate", str(tmp_path / "clf"), "--task", "classify", "--data", str(data)]) == 2
    assert "line 2: unknown label 'z'" in capsys.readouterr().err
