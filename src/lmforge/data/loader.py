"""Pretraining batches: which windows of the token stream are trained on, in which order.

The order is a pure function of (seed, global sample index g), so a run resumes exactly from a saved g,
and any number of processes can each take their own disjoint range of g. This definition is a contract;
changing it changes every run:

* per epoch ``n = (num_tokens - 1 - (block_size - 1)) // block_size`` samples (the same for every epoch);
* epoch ``e`` draws from ``torch.Generator().manual_seed(epoch_seed(seed, e))``, in this order, a start
  offset ``off_e = randint(0, block_size)`` and then a permutation ``perm_e = randperm(n)``;
* sample ``g`` lies in epoch ``e = g // n``; its block is ``j = perm_e[g % n]``; its tokens are
  ``stream[off_e + j*block_size : off_e + j*block_size + block_size + 1]``, x the first block_size and
  y the last block_size (the next-token targets).

The random offset shifts block boundaries from epoch to epoch, so over epochs the model sees every
position of a sequence at every place in the context window.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ..config import UserError
from .shards import TokenData


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``; kept within torch's accepted range."""
    return (seed * 1_000_003 + epoch) % (1 << 63)


def _to_tensors(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    arr = torch.from_numpy(np.stack(rows).astype(np.int64))
    return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


class BlockSampler:
    """Maps global sample indices to (x, y) training windows; see the module docstring for the order."""

    def __init__(self, num_tokens: int, block_size: int, seed: int):
        if block_size < 1:
            raise UserError(f"block_size must be >= 1, got {block_size}")
        self.num_tokens = int(num_tokens)
        self.block_size = int(block_size)
        self.seed = int(seed)
        offset_max = block_size - 1
        self.n = (self.num_tokens - 1 - offset_max) // block_size
        if self.n < 1:
            raise UserError(f"the training split has {self.num_tokens} tokens, too few for block_size {block_size} "
                            f"(needs at least {2 * block_size}); use more data or a smaller block size")
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.n

    @property
    def num_samples(self) -> int:
        """Samples per epoch."""
        return self.n

    def epoch(self, e: int) -> tuple[int, torch.Tensor]:
        """(start offset, block permutation) of epoch ``e``."""
        got = self._cache.get(e)
        if got is None:
            g = torch.Generator()
            g.manual_seed(epoch_seed(self.seed, e))
            off = int(torch.randint(0, self.block_size, (1,), generator=g).item())
            perm = torch.randperm(self.n, generator=g)
            if len(self._cache) >= 2:  # keep the current and the previous epoch (a batch may straddle them)
                self._cache.pop(min(self._cache))
            got = self._cache[e] = (off, perm)
        return got

    def start(self, g: int) -> int:
        """First token of sample ``g`` in the stream."""
        if g < 0:
            raise IndexError(f"sample index must be >= 0, got {g}")
        off, perm = self.epoch(g // self.n)
        return off + int(perm[g % self.n]) * self.block_size

    def batch(self, tokens: TokenData, global_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (len(global_indices), block_size) int64, for the given global sample indices."""
        if len(tokens) < self.num_tokens:
            raise ValueError(f"sampler built for {self.num_tokens} tokens, data has {len(tokens)}")
        T = self.block_size
        rows = []
        for g in global_indices:
            s = self.start(int(g))
            rows.append(tokens.get(s, s + T + 1))
        return _to_tensors(rows)


class ValBatches:
    """A fixed set of validation batches: evenly spaced, non-overlapping blocks of the split.

    Uses ``batch_size * num_batches`` blocks, or every available block when the split is smaller (then
    there are fewer batches, the last one possibly short).
    """

    def __init__(self, tokens: TokenData, block_size: int, batch_size: int, num_batches: int):
        if batch_size < 1 or num_batches < 1:
            raise ValueError("batch_size and num_batches must be >= 1")
        n = len(tokens)
        if n == 0:
            raise UserError("the validation split is empty; prepare the data with --val-fraction > 0")
        available = (n - 1) // block_size
        if available < 1:
            raise UserError(f"the validation split has {n} tokens, too few for block_size {block_size} "
                            f"(needs at least {block_size + 1}); prepare with a larger --val-fraction")
        k = min(batch_size * num_batches, available)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.starts = [(i * available // k) * block_size for i in range(k)]

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    @property
    def num_tokens(self) -> int:
        """Target tokens evaluated over all batches."""
        return len(self.starts) * self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        T = self.block_size
        starts = self.starts[i * self.batch_size:(i + 1) * self.batch_size]
        return _to_tensors([self.tokens.get(s, s + T + 1) for s in starts])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]
