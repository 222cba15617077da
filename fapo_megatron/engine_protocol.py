"""The engine protocol: one small interface for the policy's rollout engine and for the GenRM.

An engine generates from prompts (text or token ids) and returns, per sample, the tokens, the text,
the per-token log-probs under the engine's sampling distribution and why it stopped. Colocated runs
time-share devices, so every engine can release its memory and take it back, and take new weights
by name (HF names, full tensors) in bounded buckets.

It imports nothing from fapo_megatron, so engines/ (the backends), genrm/ (which asks an engine) and the
trainer all build on it without depending on each other.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    stop: list[str] = field(default_factory=list)
    """Generation stops after the first of these strings (the string is kept in the text)."""
    n: int = 1
    """Samples per prompt; results come back prompt-major (all samples of prompt 0 first)."""
    seed: int | None = None
    """Seed for reproducible sampling where the backend supports it."""


@dataclass(kw_only=True)
class Generation:
    prompt_index: int
    """Index of the prompt (in the request) this sample answers."""
    token_ids: list[int]
    """Generated token ids, without the prompt."""
    text: str
    """Decoded generated text."""
    logprobs: list[float]
    """Log-prob of each generated token under the engine's (temperature-scaled) sampling distribution."""
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)."""
    prompt_token_ids: list[int] = field(default_factory=list)
    """The prompt as the engine tokenized it."""
    weight_version: int = 0
    """Weight pushes the engine had taken when it sampled this (0: its initial weights); the trainer's count of
    pushes minus it is the sample's staleness."""


MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""The parts of an engine's device memory that release_memory / resume_memory name (SGLang's GPU_MEMORY_TYPE_*)."""

WeightBucket = list[tuple[str, torch.Tensor]]
"""(HF parameter name, full tensor) pairs pushed to an engine in one call."""


class EngineError(RuntimeError):
    """An engine could not serve a request (dead server, timeout, bad response)."""


class Engine(abc.ABC):
    """What the trainer and the GenRM client need from a generation backend."""

    @abc.abstractmethod
    def start(self) -> None:
        """Bring the engine up; returns once it serves requests."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """True when the engine answers."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Sample `params.n` completions per prompt; prompts are text or token ids."""

    def generate_stream(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate`, reporting finished samples as they complete: chunks of (position, generation), where position
        is the sample's index in the prompt-major list `generate` returns. Every sample is reported exactly once.

        This default reports everything at the end; a backend that knows when each request finishes (SGLang per
        request, the embedded engine per finished row) overrides it so that consumers (the GenRM) start early.
        """
        yield list(enumerate(self.generate(prompts, params)))

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Replace parameters by HF name, bucket by bucket; the engine serves the new weights afterwards."""

    @abc.abstractmethod
    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Give back device memory while others use the devices: the parts `tags` (of MEMORY_TAGS) name, None for
        what the engine can give back. Released weights may lose their values: push weights before generating."""

    @abc.abstractmethod
    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back the parts `tags` name (None: everything released), in stages if wanted: weights before a push,
        KV cache and graphs after it; the engine generates again once nothing is released."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free everything it holds; safe to call twice."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
