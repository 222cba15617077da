"""The training batch the trainer hands the actor: rollouts of a step, as right-padded token tensors.

Legend: B = sequences (rollouts, group-major: the n rollouts of a prompt are consecutive), S = padded length of
prompt + response. Position t of `response_mask`, `old_logprobs`, `rollout_logprobs` and `ref_logprobs` is about
token t: logprobs[b, t] = log p(tokens[b, t] | tokens[b, :t]), so column 0 (a prompt token) is never counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_PER_TOKEN = ("response_mask", "old_logprobs", "rollout_logprobs", "ref_logprobs")


@dataclass(kw_only=True)
class TrainBatch:
    tokens: torch.Tensor
    """[B, S] long: prompt then response, right-padded (pad id is irrelevant: padding is never attended to)."""
    lengths: torch.Tensor
    """[B] long: real tokens (prompt + response) of each row."""
    response_mask: torch.Tensor
    """[B, S] float: 1 where token t is a response token whose log-prob enters the loss."""
    advantages: torch.Tensor
    """[B] float: one advantage per rollout."""
    group_ids: torch.Tensor
    """[B] long: the prompt (group) each rollout answers."""
    old_logprobs: torch.Tensor | None = None
    """[B, S] float: log-probs under the policy that sampled, recomputed by the actor (None: the actor computes
    them before the update)."""
    rollout_logprobs: torch.Tensor | None = None
    """[B, S] float: the rollout engine's own log-probs (logged against the actor's; TIS correction)."""
    ref_logprobs: torch.Tensor | None = None
    """[B, S] float: reference log-probs of the KL term (None: the rollout log-probs serve)."""

    def __post_init__(self):
        if self.tokens.dim() != 2:
            raise ValueError(f"TrainBatch.tokens must be [B, S], got shape {tuple(self.tokens.shape)}")
        num, seq = self.tokens.shape
        for name in ("lengths", "advantages", "group_ids"):
            if tuple(getattr(self, name).shape) != (num,):
                raise ValueError(f"TrainBatch.{name} has shape {tuple(getattr(self, name).shape)}, expected ({num},)")
        for name in _PER_TOKEN:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (num, seq):
                raise ValueError(f"TrainBatch.{name} has shape {tuple(value.shape)}, expected ({num}, {seq})")
        if num and (int(self.lengths.max()) > seq or int(self.lengths.min()) < 1):
            raise ValueError(f"TrainBatch.lengths must lie in [1, {seq}], got {self.lengths.tolist()}")
        beyond = torch.arange(seq, device=self.lengths.device)[None, :] >= self.lengths[:, None]
        if bool((self.response_mask.bool() & beyond.to(self.response_mask.device)).any()):
            raise ValueError("TrainBatch.response_mask marks padding positions (at or beyond `lengths`)")
        if num and bool(self.response_mask[:, 0].bool().any()):
            raise ValueError("TrainBatch.response_mask marks column 0, which has no log-prob (no context)")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, S] bool: True on real tokens."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :] < self.lengths[:, None]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @property
    def num_response_sequences(self) -> int:
        """Rollouts with at least one counted token (the seq-mean normaliser)."""
        return int((self.response_mask.sum(dim=1) > 0).sum().item())

    def _map(self, fn) -> TrainBatch:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainBatch(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in values.items()})

    def select(self, index: torch.Tensor | slice | list[int]) -> TrainBatch:
        """Rows `index` (a slice, list or index tensor) of every tensor."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        return self._map(lambda t: t[index])

    def chunks(self, size: int) -> list[TrainBatch]:
        """Consecutive row blocks of `size` (the last may be shorter)."""
        if size <= 0:
            raise ValueError(f"chunk size {size} must be > 0")
        return [self.select(slice(start, start + size)) for start in range(0, len(self), size)]

    def split(self, count: int) -> list[TrainBatch]:
        """`count` consecutive row blocks of near-equal size (fewer when there are fewer rows than `count`); with
        count x size rows they are `chunks(size)`."""
        if count <= 0:
            raise ValueError(f"split count {count} must be > 0")
        count = min(count, len(self))
        bounds = [round(i * len(self) / count) for i in range(count + 1)]
        return [self.select(slice(bounds[i], bounds[i + 1])) for i in range(count)]

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Data-parallel rank `rank`'s contiguous 1/world_size of the rows; B must divide evenly."""
        if len(self) % world_size:
            raise ValueError(f"a batch of {len(self)} rollouts does not split evenly over {world_size} ranks")
        per_rank = len(self) // world_size
        return self.select(slice(rank * per_rank, (rank + 1) * per_rank))

    def trimmed(self, multiple: int = 1) -> TrainBatch:
        """Drop padding columns beyond the longest row (kept to a multiple of `multiple`)."""
        longest = int(self.lengths.max().item()) if len(self) else 1
        keep = min(self.tokens.shape[1], -(-longest // multiple) * multiple)
        return self._map(lambda t: t[:, :keep] if t.dim() == 2 else t)

    def to(self, device: torch.device | str) -> TrainBatch:
        return self._map(lambda t: t.to(device))
