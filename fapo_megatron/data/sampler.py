"""Shuffled prompt batches, epoch after epoch, with a position that survives a restart."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Yields lists of `batch_size` items; each epoch is a fresh permutation drawn from (seed, epoch).

    Only full batches are served: the last `len(items) % batch_size` items of an epoch's order are left out of
    that epoch (a different set each epoch). The permutation depends on nothing but (seed, epoch), so
    `state_dict()` is just (epoch, position) and a run restored from it continues with exactly the next batch.
    """

    def __init__(self, items: Sequence[T], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if len(items) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(items)} items available")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        """Epochs completed so far."""
        self.position = 0
        """Items of the current epoch's order already served."""
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def next_batch(self) -> list[T]:
        """The next batch, moving on to a new epoch when the current one has no full batch left."""
        if self.position + self.batch_size > len(self.items):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        batch = [self.items[index] for index in self._order[self.position : self.position + self.batch_size]]
        self.position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_items": len(self.items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; ValueError when it was saved for other items, seed or batch size."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("num_items", len(self.items))):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]} but this sampler has {key}={mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.items):
            raise ValueError(f"sampler state out of range: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))


def prompt_shard(num_prompts: int, shard: int, num_shards: int) -> range:
    """Contiguous, balanced share `shard` of `num_prompts` prompts."""
    base, extra = divmod(num_prompts, num_shards)
    start = shard * base + min(shard, extra)
    return range(start, start + base + (1 if shard < extra else 0))
