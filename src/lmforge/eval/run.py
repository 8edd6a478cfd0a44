"""`lmforge evaluate`: load a model, score it on a task, print a table and optionally write JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..config import EvaluateConfig, UserError
from .report import format_results, write_json


def read_qa(path: str | Path) -> list[dict]:
    """Question/answer examples: .jsonl lines {"question", "context"?, "answers": [...] or "answer"} or
    chat form {"messages": [..., {"role": "assistant", "content": ANSWER}]}, or a SQuAD v1.1 .json file."""
    from ..finetune.data import read_jsonl, to_messages

    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p}: not a valid JSON file ({e})") from None
        out = []
        for article in data.get("data", []) if isinstance(data, dict) else []:
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    answers = [a["text"] for a in qa.get("answers", []) if isinstance(a, dict) and "text" in a]
                    if answers:
                        out.append({"question": qa["question"], "context": para.get("context", ""),
                                    "answers": answers})
        if not out:
            raise UserError(f"{p} holds no SQuAD questions (expected {{\"data\": [{{\"paragraphs\": [...]}}]}})")
        return out
    out = []
    for no, obj in read_jsonl(p):
        where = f"{p} line {no}"
        if "messages" in obj:
            msgs = to_messages(obj, where)
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{where}: the last message must be the assistant's reference answer")
            out.append({"messages": msgs[:-1], "answers": [msgs[-1]["content"]]})
            continue
        answers = obj.get("answers", obj.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if isinstance(answers, dict) and isinstance(answers.get("text"), list):  # HF squad layout
            answers = answers["text"]
        if not isinstance(obj.get("question"), str) or not isinstance(answers, list) or not answers or \
                not all(isinstance(a, str) for a in answers):
            raise UserError(f"{where}: needs a string \"question\" and \"answers\" (a list of strings)")
        out.append({"question": obj["question"], "context": obj.get("context") or "", "answers": answers})
    return out


def _qa_prompt(ex: dict, fmt: str, tok) -> str:
    from ..generate import chat_prompt

    if "messages" in ex:
        return chat_prompt(tok, ex["messages"])
    if fmt == "chat":
        content = (f"Answer with a short span copied from the context.\n\nContext: {ex['context']}\n\n"
                   f"Question: {ex['question']}") if ex["context"] else ex["question"]
        return chat_prompt(tok, [{"role": "user", "content": content}])
    head = f"Context: {ex['context']}\n" if ex["context"] else ""
    return f"{head}Question: {ex['question']}\nAnswer:"


def generate_answers(lm, examples: list[dict], cfg: EvaluateConfig, progress: bool = True) -> list:
    """Greedy answers (GenerationResult) to each example, in batches."""
    prompts = [_qa_prompt(ex, cfg.prompt_format, lm.tokenizer) for ex in examples]
    stop = ["\n"] if cfg.prompt_format == "plain" and not any("messages" in e for e in examples) else []
    results = []
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", leave=False)
    turn_end = lm._end_of_turn_ids()
    for s in batches:
        results += lm.generate(prompts[s:s + cfg.batch_size], max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                               stop=stop, details=True, stop_ids=turn_end, seed=0)
    return results


def evaluate(cfg: EvaluateConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run one evaluation; returns the results (also printed as a table, and written to cfg.out)."""
    cfg.validate()
    n = cfg.max_examples or None
    if cfg.task in ("bleu", "chrf", "rouge"):
        from .text_metrics import evaluate_seq2seq, format_text_scores

        result = evaluate_seq2seq(cfg.model, cfg.data, cfg.task, max_examples=cfg.max_examples,
                                  batch_size=cfg.batch_size, device=cfg.device, progress=progress)
        return _report(cfg, result, format_text_scores, log)
    if cfg.task == "classify":
        from ..finetune.classify import load_classifier, predict
        from ..finetune.data import label_ids, read_labeled
        from .metrics import classification_report

        model, tok, labels, meta = load_classifier(cfg.model, device=cfg.device)
        examples = read_labeled(cfg.data, cfg.text_field, cfg.label_field)[:n]
        y = label_ids(examples, labels)
        max_len = cfg.max_len or meta.get("max_len") or model.cfg.block_size
        preds = predict(model, tok, [e.text for e in examples], max_len, cfg.batch_size, progress=progress,
                        suffix=meta.get("suffix") or "")
        result = {"task": "classify", **classification_report(y, preds, labels)}
    else:
        from ..lm import LM

        lm = LM.load(cfg.model, device=cfg.device)
        lm._need_tokenizer()
        if cfg.task == "perplexity":
            from .perplexity import perplexity, read_documents

            docs = read_documents(cfg.data, cfg.text_field)[:n]
            result = perplexity(lm.model, lm.tokenizer, docs, cfg.max_len, cfg.batch_size, progress=progress)
        else:
            from .metrics import squad_scores

            examples = read_qa(cfg.data)[:n]
            outs = generate_answers(lm, examples, cfg, progress=progress)
            result = {"task": "squad", **squad_scores([o.text.strip() for o in outs], [e["answers"] for e in examples]),
                      "stopped_fraction": sum(o.finish_reason == "stop" for o in outs) / len(outs),
                      "samples": [{"prompt": e.get("question") or e["messages"][-1]["content"], "answer": o.text,
                                   "reference": e["answers"][0], "finish_reason": o.finish_reason}
                                  for e, o in list(zip(examples, outs))[:20]]}
    return _report(cfg, result, format_results, log)


def _report(cfg: EvaluateConfig, result: dict, fmt: Callable[[dict], str], log: Callable[[str], None]) -> dict:
    """Name the model and data in the results, print their table, and write them to cfg.out if given."""
    result = {"model": str(cfg.model), "data": str(cfg.data), **result}
    log(fmt(result))
    if cfg.out:
        write_json(cfg.out, result)
        log(f"results written to {cfg.out}")
    return result

