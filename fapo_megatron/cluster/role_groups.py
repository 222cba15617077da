"""Typed groups of the two worker roles: one method per remote call, with the result's type.

`PolicyGroup` drives the roles.policy.PolicyWorker ranks, `GenRMGroup` the roles.genrm.GenRMWorker replicas (it is
the run's Judge). The trainer and run_setup call these methods; dispatch by method name (`WorkerGroup.call`)
stays inside cluster/, next to the worker classes' method names it must match.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.cluster.workers import WorkerGroup
from fapo_megatron.data.sampler import prompt_shard
from fapo_megatron.engine_protocol import Generation, SamplingParams
from fapo_megatron.genrm.types import JudgeRequest, Verdict


class PolicyGroup:
    """Every rank runs every call (the actor's collectives need all of them); rank 0's result stands for all."""

    def __init__(self, group: WorkerGroup):
        self.group = group

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Each engine rank samples its share; the samples come back prompt-major, so groups stay contiguous."""
        generations = [g for shard in self.group.call("generate", prompts, params) for g in shard]
        generations.sort(key=lambda g: g.prompt_index)
        return generations

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate` as the engines finish samples: chunks of (prompt-major position, generation), from whichever
        rank yields first (`PolicyWorker.generate_stream` over `WorkerGroup.stream`)."""
        return self.group.stream("generate_stream", prompts, params)

    def enter_genrm(self) -> None:
        """The rollout engines give their device memory back for the GenRM phase; the actors stay off it."""
        self.group.call("enter_genrm")

    def compute_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(old log-probs, entropy) per token of `batch`."""
        return self.group.call("compute_logprobs", batch)[0]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.group.call("train_step", batch)[0]

    def sync_weights(self) -> list[dict[str, float]]:
        """Per rank: seconds, bytes and buckets pushed into its engine (0 bytes on ranks without one)."""
        return self.group.call("sync_weights")

    def memory_ledger(self) -> dict[str, float]:
        """Per key, the most any rank held (`memory/<phase>/...` since the last call)."""
        ledgers = self.group.call("memory_ledger")
        return {key: max(ledger.get(key, 0.0) for ledger in ledgers) for key in ledgers[0]}

    def save(self, directory: str, step: int, extra_state: dict) -> None:
        """Checkpoint as `step_<step>`: the trainer's step names checkpoints, not the optimizer's count."""
        self.group.call("save", directory, step, extra_state)

    def finish_checkpoint(self, blocking: bool = True) -> str | None:
        """Publish a background save (trainer.async_checkpoint) once written; blocking waits for the writers."""
        return self.group.call("finish_checkpoint", blocking)[0]

    def load(self, directory: str) -> dict:
        """The extra state saved with the checkpoint (step, sampler position)."""
        return self.group.call("load", directory)[0]


class GenRMGroup:
    """The GenRM replicas as one Judge: a step's requests split over them in order, engines awake only in the
    genrm phase (roles/genrm.GenRMWorker.enter reads phases.RESIDENCY); it is built, and its engines start, in the
    genrm phase, and leaves it for the log-prob pass that follows the judge in a step."""

    def __init__(self, group: WorkerGroup):
        self.group = group
        self.group.call("enter", "logprobs")

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        num = self.group.num_workers
        shards = [list(requests[i] for i in prompt_shard(len(requests), r, num)) for r in range(num)]
        self.group.call("enter", "genrm")
        try:
            answers = self.group.call_each("judge", [(shard,) for shard in shards])
        finally:
            self.group.call("enter", "logprobs")
        return [verdict for shard in answers for verdict in shard]
