"""Colocated time-sharing: the rollout engine, the GenRM engine and the actor take turns on the same devices.

One step is: rollout -> switch_to_genrm (release rollout memory, resume GenRM) -> genrm -> release_genrm ->
train (actor) -> push_weights (actor -> rollout engine) -> resume_rollout. Calling a phase out of turn
raises, so a trainer bug cannot leave two models holding the devices at once. Each phase is timed; on CUDA
the free device memory (torch.cuda.mem_get_info) before and after each phase is recorded too.
Without a GenRM engine (program checker, or GenRM on its own pool) the GenRM phases still run, as no-ops
on memory, so the order stays one order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fapo_megatron.engine_protocol import Engine, Generation, SamplingParams, WeightBucket

PHASES = ("rollout", "switch_to_genrm", "genrm", "release_genrm", "train", "push_weights", "resume_rollout")


class PhaseOrderError(RuntimeError):
    """A colocated phase was called out of turn."""


@dataclass
class PhaseRecord:
    name: str
    seconds: float
    free_bytes_before: int | None = None
    """Free device memory when the phase began (CUDA only)."""
    free_bytes_after: int | None = None


class ColocatedScheduler:
    """Drives one colocated step at a time over engines of the protocol and the actor's callables.

    `device`: the CUDA device whose free memory is recorded; None (or a CPU device) records times only.
    The rollout engine starts holding its memory; the GenRM engine, when given, starts released.
    """

    def __init__(self, rollout: Engine, genrm: Engine | None = None, *, device: str | torch.device | None = None):
        self.rollout_engine = rollout
        self.genrm_engine = genrm
        self.device = torch.device(device) if device is not None else None
        self.records: list[PhaseRecord] = []
        self.steps_done = 0
        self._next = 0
        if genrm is not None:
            genrm.release_memory()

    @property
    def next_phase(self) -> str:
        return PHASES[self._next]

    def step_seconds(self) -> dict[str, float]:
        """Seconds per phase in the last complete (or current) step."""
        return {r.name: r.seconds for r in self.records[-len(PHASES) :]} if self.records else {}

    def _run(self, name: str, work: Callable[[], object]):
        if PHASES[self._next] != name:
            raise PhaseOrderError(f"colocated phase {name!r} called out of turn; next is {self.next_phase!r}")
        if self._next == 0:
            self.records = []
        before = self._free_bytes()
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.records.append(PhaseRecord(name, seconds, before, self._free_bytes()))
        self._next = (self._next + 1) % len(PHASES)
        if self._next == 0:
            self.steps_done += 1
        return result

    def _free_bytes(self) -> int | None:
        if self.device is None or self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    # ------------------------------------------------------------------------------------------ phases
    def rollout(self, prompts: Sequence, params: SamplingParams) -> list[Generation]:
        return self._run("rollout", lambda: self.rollout_engine.generate(prompts, params))

    def switch_to_genrm(self) -> None:
        def work():
            self.rollout_engine.release_memory()
            if self.genrm_engine is not None:
                self.genrm_engine.resume_memory()

        self._run("switch_to_genrm", work)

    def genrm(self, judge: Callable[[], object]):
        """Run the GenRM queries (`judge` calls the GenRM client, which talks to the GenRM engine)."""
        return self._run("genrm", judge)

    def release_genrm(self) -> None:
        self._run("release_genrm", lambda: self.genrm_engine.release_memory() if self.genrm_engine else None)

    def train(self, train_step: Callable[[], object]):
        """Run the actor's update (it loads its state onto the devices and offloads it again inside)."""
        return self._run("train", train_step)

    def push_weights(self, buckets: Iterable[WeightBucket] | Callable[[], Iterable[WeightBucket]]) -> None:
        """New actor weights into the (still released) rollout engine, bucket by bucket."""

        def work():
            self.rollout_engine.update_weights(buckets() if callable(buckets) else buckets)

        self._run("push_weights", work)

    def resume_rollout(self) -> None:
        self._run("resume_rollout", self.rollout_engine.resume_memory)
