"""Results as a readable table and as JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import UserError


def write_json(path: str | Path, data: dict) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {p}: {e.strerror or e}") from None
    return p


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table with right-aligned numbers."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(items):
        return "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(items, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def format_classification(r: dict) -> str:
    labels = r["labels"]
    out = [f"accuracy {r['accuracy']:.4f}   macro-F1 {r['macro_f1']:.4f}   "
           f"majority baseline {r['majority_baseline']:.4f}   ({r['examples']} examples)", ""]
    out.append(table([[l, r["per_class"][l]["precision"], r["per_class"][l]["recall"], r["per_class"][l]["f1"],
                       r["per_class"][l]["support"]] for l in labels], ["label", "precision", "recall", "f1", "support"]))
    out += ["", "confusion matrix (rows: true label, columns: predicted)"]
    short = [l[:10] for l in labels]
    out.append(table([[labels[i][:10], *row] for i, row in enumerate(r["confusion_matrix"])], ["", *short]))
    return "\n".join(out)


def format_results(r: dict) -> str:
    task = r.get("task")
    if task == "classify":
        return format_classification(r)
    if task == "perplexity":
        return table([["perplexity", r["perplexity"]], ["bits per byte", r["bits_per_byte"]],
                      ["nll per token (nats)", r["nll_per_token"]], ["tokens", r["tokens"]], ["bytes", r["bytes"]],
                      ["documents", r["documents"]]], ["metric", "value"])
    if task == "squad":
        return table([["exact match", r["exact_match"]], ["F1", r["f1"]], ["examples", r["examples"]],
                      ["ended with EOS", r.get("stopped_fraction", 0.0)]], ["metric", "value"])
    return json.dumps(r, indent=2)
