"""Masked-language-model pretraining of an encoder (BERT, Devlin et al. 2019): `lmforge pretrain --objective mlm`.

It reads the same prepared token shards and windows as causal pretraining (data/loader.py) and differs only
in the batch and the loss, which is what this module supplies to train/pretrain.py:

* Of every window, each token is chosen for prediction with probability ``mlm_probability`` (0.15; at
  least one per window). A chosen token is replaced by the mask token 80% of the time, by a random token
  10% of the time, and left unchanged 10% of the time (BERT's 80/10/10, section 3.1 and appendix C.2).
* The loss is the cross-entropy at the chosen positions only (labels -100 elsewhere).
* The choice for the window with global sample index ``g`` is drawn from a generator seeded with
  (seed, g) alone, so a resumed run masks every window exactly as an uninterrupted one, and under
  torchrun each process masks its own windows independently. Validation windows use a disjoint seed
  stream, the same at every evaluation.

The mask token: the tokenizer's own ([MASK], <mask> or <|mask|>) when it has one; otherwise (lmforge's
tokenizers have none) one extra embedding row after the tokenizer's vocabulary, whose id is written to the
checkpoint's config.json as "mask_id".
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")
_VAL_STREAM = 0x5EED_0F_7A1  # seeds of validation windows: far from any training sample index


def find_mask_id(tokenizer) -> Optional[int]:
    for t in MASK_TOKENS:
        i = tokenizer.token_to_id(t) if tokenizer is not None else None
        if i is not None:
            return int(i)
    return None


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of one window: a function of (seed, global sample index) only."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (1 << 63)


def mask_tokens(x_BT: torch.Tensor, indices: list[int], *, seed: int, probability: float, mask_id: int,
                vocab_size: int, special_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of an MLM batch. ``vocab_size`` bounds the random replacement tokens (real tokens
    only: the extra mask row is never drawn); ``special_ids`` are never chosen."""
    B, T = x_BT.shape
    inputs = x_BT.clone()
    labels = torch.full_like(x_BT, -100)
    special = torch.zeros(T, dtype=torch.bool)
    specials = torch.tensor(sorted(set(int(s) for s in special_ids)), dtype=torch.long)
    for r, g in enumerate(indices):
        gen = torch.Generator().manual_seed(sample_seed(seed, int(g)))
        row = x_BT[r]
        if len(specials):
            special = torch.isin(row, specials)
        chosen = (torch.rand(T, generator=gen) < probability) & ~special
        how = torch.rand(T, generator=gen)
        random_tok = torch.randint(0, vocab_size, (T,), generator=gen)
        if not bool(chosen.any()):  # every window teaches something
            candidates = (~special).nonzero().flatten()
            if len(candidates) == 0:
                continue
            chosen[candidates[int(torch.randint(0, len(candidates), (1,), generator=gen))]] = True
        labels[r] = torch.where(chosen, row, labels[r])
        inputs[r] = torch.where(chosen & (how < 0.8), torch.full_like(row, mask_id), inputs[r])
        inputs[r] = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_tok, inputs[r])
    return inputs, labels


def mlm_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy at the chosen positions."""
    logits_BTV = model(batch["x"], head="mlm")
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["y"].flatten(), ignore_index=-100)


class MLMObjective:
    """What train/pretrain.py asks of an objective: the model config, the batches and the loss."""

    def __init__(self, cfg, tokenizer, data_vocab: int):
        self.seed = cfg.train.seed
        self.probability = cfg.mlm_probability
        self.data_vocab = int(data_vocab)
        own = find_mask_id(tokenizer)
        self.mask_id = own if own is not None else self.data_vocab  # an extra row after the vocabulary
        pad = getattr(tokenizer, "pad_id", None)
        self.special_ids = [pad] if pad is not None else []

    def model_config(self, mcfg):
        need = max(self.data_vocab, self.mask_id + 1)
        if mcfg.vocab_size < need:
            mcfg = dataclasses.replace(mcfg, vocab_size=need)
        return mcfg.validate()

    def _mask(self, x_BT: torch.Tensor, indices: list[int]) -> dict:
        inputs, labels = mask_tokens(x_BT, indices, seed=self.seed, probability=self.probability,
                                     mask_id=self.mask_id, vocab_size=self.data_vocab, special_ids=self.special_ids)
        return {"x": inputs, "y": labels}

    def wrap(self, get_batch: Callable[[list[int]], dict], val_batches: Optional[Callable[[], Iterable[dict]]]):
        """(get_batch, val_batches, loss_fn, extra_config) for the MLM objective from the causal ones."""

        def mlm_batch(indices: list[int]) -> dict:
            return self._mask(get_batch(indices)["x"], indices)

        def mlm_val():
            start = _VAL_STREAM
            for b in val_batches():
                x = b["x"]
                yield self._mask(x, list(range(start, start + x.shape[0])))
                start += x.shape[0]

        extra = {"objective": "mlm", "mask_id": self.mask_id, "mlm_probability": self.probability}
        return mlm_batch, (mlm_val if val_batches is not None else None), mlm_loss, extra
