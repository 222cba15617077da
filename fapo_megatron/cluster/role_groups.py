"""Typed groups of the worker roles: one method per remote call, with the result's type.

`PolicyGroup` drives the roles.policy.PolicyWorker ranks, `RolloutGroup` the roles.rollout.RolloutWorker replicas of a
separate rollout pool, `GenRMGroup` the roles.genrm.GenRMWorker replicas (it is the run's Judge; on a pool of its own
it also takes a step's requests as rollouts finish, `ReplicaVerdictStream`). PolicyGroup and RolloutGroup generate
alike (`Generating`): the trainer asks whichever hosts the engines.
The trainer and run_setup call these methods; dispatch by method name (`WorkerGroup.call`) stays inside cluster/,
next to the worker classes' method names it must match.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Hashable, Iterator, Sequence

import ray
import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.cluster.workers import WorkerGroup
from fapo_megatron.config import GenRMConfig
from fapo_megatron.data.sampler import prompt_shard
from fapo_megatron.engine_protocol import Generation, SamplingParams
from fapo_megatron.genrm.prompt import split_steps
from fapo_megatron.genrm.types import JudgeRequest, Verdict, VerdictStatus


class Generating:
    """Generation over workers that each host an engine replica's share (roles.rollout.EngineShard) or none."""

    group: WorkerGroup

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Each engine samples its share; the samples come back prompt-major, so groups stay contiguous."""
        return self.generate_async(prompts, params).result()

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> PendingGenerations:
        """`generate` started: the workers sample while the caller goes on (trainer.off_policy_steps)."""
        return PendingGenerations(self.group, self.group.call_async("generate", prompts, params))

    def generate_stream(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Iterator[list[tuple[int, Generation]]]:
        """`generate` as the engines finish samples: chunks of (prompt-major position, generation), from whichever
        worker yields first (`generate_stream` of the workers over `WorkerGroup.stream`)."""
        return self.group.stream("generate_stream", prompts, params)


class PendingGenerations:
    """Samples being generated; `result()` waits for them (prompt-major, as `generate` returns them)."""

    def __init__(self, group: WorkerGroup, refs: list[ray.ObjectRef]):
        self.group, self.refs = group, refs

    def wait(self) -> None:
        """Block until every worker is done, without fetching the samples."""
        ray.wait(self.refs, num_returns=len(self.refs))

    def result(self) -> list[Generation]:
        generations = [g for shard in self.group.get(self.refs, "generate") for g in shard]
        generations.sort(key=lambda g: g.prompt_index)
        return generations


class PolicyGroup(Generating):
    """Every rank runs every call (the actor's collectives need all of them); rank 0's result stands for all."""

    def __init__(self, group: WorkerGroup):
        self.group = group
        self.receivers: RolloutGroup | None = None
        """The rollout workers a separate pool's weight pushes go to (set by RolloutGroup.connect)."""

    def enter_genrm(self) -> None:
        """The rollout engines give their device memory back for the GenRM phase; the actors stay off it."""
        self.group.call("enter_genrm")

    def compute_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(old log-probs, entropy) per token of `batch`."""
        return self.group.call("compute_logprobs", batch)[0]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.group.call("train_step", batch)[0]

    def sync_weights(self) -> list[dict[str, float]]:
        """Per rank: seconds, bytes and buckets pushed into its engine (0 bytes on ranks without one); with a
        separate rollout pool rank 0 broadcasts them and every rollout worker takes them, once its current
        generation is done."""
        receiving = self.receivers.receive_weights_async() if self.receivers is not None else None
        sync = self.group.call("sync_weights")
        if receiving is not None:
            self.receivers.group.get(receiving, "receive_weights")
        return sync

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


class RolloutGroup(Generating):
    """The rollout engines on a pool of their own (`rollout.placement=separate`): one worker per replica."""

    def __init__(self, group: WorkerGroup):
        self.group = group

    def connect(self, policy: PolicyGroup) -> None:
        """Open the side group of weight pushes (actor rank 0 and every rollout worker join at once) and have
        `policy.sync_weights` push through it."""
        address, port = policy.group.call_rank(0, "weight_broadcast_address")
        world = 1 + self.group.num_workers
        joining = [
            self.group.call_rank_async(r, "join_weight_broadcast", address, port, world, r + 1)
            for r in range(self.group.num_workers)
        ]
        policy.group.call_rank(0, "join_weight_broadcast", address, port, world)
        self.group.get(joining, "join_weight_broadcast")
        policy.receivers = self

    def receive_weights_async(self) -> list[ray.ObjectRef]:
        """Every worker takes the next push (queued behind a generation under way); collect with group.get."""
        return self.group.call_async("receive_weights")


class GenRMGroup:
    """The GenRM replicas as one Judge: a step's requests split over them in order.

    Colocated, the engines are awake only in the genrm phase (they share the actor's devices; GenRMWorker.enter
    reads phases.RESIDENCY; the group is built, and its engines start, in the genrm phase and leaves it for the
    log-prob pass that follows the judge); on a pool of their own (`genrm.placement=separate`) they stay awake and
    `open_stream` takes requests while the rollout runs.
    """

    def __init__(self, group: WorkerGroup, genrm: GenRMConfig):
        self.group = group
        self.genrm = genrm
        self.own_devices = genrm.placement == "separate"
        if not self.own_devices:
            self.group.call("enter", "logprobs")

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        num = self.group.num_workers
        shards = [list(requests[i] for i in prompt_shard(len(requests), r, num)) for r in range(num)]
        with self._genrm_phase():
            answers = self.group.call_each("judge", [(shard,) for shard in shards])
        return [verdict for shard in answers for verdict in shard]

    @contextlib.contextmanager
    def _genrm_phase(self):
        """Colocated engines wake for the judge and sleep again after it; on their own pool they stay awake."""
        if self.own_devices:
            yield
            return
        self.group.call("enter", "genrm")
        try:
            yield
        finally:
            self.group.call("enter", "logprobs")

    def open_stream(self) -> ReplicaVerdictStream | None:
        """A stream for this step's requests as rollouts finish; None when colocated (the replicas can judge only
        once the rollout has given the devices back)."""
        if not self.own_devices:
            return None
        return ReplicaVerdictStream(self.group, self.genrm)


class ReplicaVerdictStream:
    """Verdicts of one step from GenRM replicas on their own devices, asked as rollouts finish.

    Each replica has at most one `judge` call out; a free one takes up to `genrm.concurrency` of the waiting
    requests at once, so a request leaves the moment a replica is free and requests batch while all are busy. The
    contract is genrm.client.VerdictStream's: `collect()` starts the deadline (`genrm.deadline_s`), waits for the
    tail and returns exactly one verdict per submitted key (a timeout verdict for what is not back by then); a key
    submitted twice is an error; `busy_seconds` is the wall time with at least one call out. A replica that fails
    fails the step (as `GenRMGroup.judge`), named by rank.
    """

    POLL_S = 0.02
    """How often the dispatcher looks for finished calls (Ray has no callback on a remote call's end)."""

    def __init__(self, group: WorkerGroup, genrm: GenRMConfig):
        self.group, self.genrm = group, genrm
        self.busy_seconds = 0.0
        self._busy_since = 0.0
        self._cond = threading.Condition()
        self._waiting: list[tuple[Hashable, JudgeRequest]] = []
        self._free = list(range(group.num_workers))
        self._out: dict[ray.ObjectRef, tuple[int, list[Hashable]]] = {}
        self._keys: dict[Hashable, JudgeRequest] = {}
        self._verdicts: dict[Hashable, Verdict] = {}
        self._error: BaseException | None = None
        self._collected = False
        """collect() has begun: no more submits."""
        self._closed = False
        """collect() has its verdicts (or its deadline passed): the dispatcher stops."""
        self._thread = threading.Thread(target=self._watch, name="genrm-replicas", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, request: JudgeRequest) -> None:
        with self._cond:
            if self._collected:
                raise RuntimeError("ReplicaVerdictStream.submit after collect(): open a new stream for the next step")
            if key in self._keys:
                raise ValueError(f"GenRM request {key!r} submitted twice; every rollout is judged once")
            self._keys[key] = request
            self._waiting.append((key, request))
            self._dispatch()
            self._cond.notify_all()

    def collect(self) -> dict:
        """{key: verdict} for every submitted key, returned by the deadline."""
        deadline = time.monotonic() + self.genrm.deadline_s
        with self._cond:
            if self._collected:
                raise RuntimeError("ReplicaVerdictStream.collect() called twice")
            self._collected = True
            while (self._waiting or self._out) and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._closed = True
            if self._out:
                self.busy_seconds += time.monotonic() - self._busy_since
            if self._out and self._error is None:  # calls back by now count even if the dispatcher has not seen them
                ready, _ = ray.wait(list(self._out), num_returns=len(self._out), timeout=0)
                for ref in ready:
                    self._take(ref)
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {key: self._verdicts[key] if key in self._verdicts else self._late(r) for key, r in self._keys.items()}

    def _late(self, request: JudgeRequest) -> Verdict:
        steps = len(split_steps(request.solution, self.genrm.max_steps))
        return Verdict(
            VerdictStatus.TIMEOUT, num_steps=steps, detail=f"batch deadline of {self.genrm.deadline_s:.1f}s passed"
        )

    def _dispatch(self) -> None:
        """Hand waiting requests to free replicas (the lock is held)."""
        while self._waiting and self._free:
            rank = self._free.pop(0)
            batch, self._waiting = self._waiting[: self.genrm.concurrency], self._waiting[self.genrm.concurrency :]
            if not self._out:
                self._busy_since = time.monotonic()
            ref = self.group.call_rank_async(rank, "judge", [request for _, request in batch])
            self._out[ref] = rank, [key for key, _ in batch]

    def _watch(self) -> None:
        """Take each finished call's verdicts and give its replica the next waiting requests, until collect ends."""
        while True:
            with self._cond:
                if self._closed:
                    return
                refs = list(self._out)
                if not refs:
                    self._cond.wait()  # woken by a submit's call or by collect closing the stream
                    continue
            done, _ = ray.wait(refs, num_returns=1, timeout=self.POLL_S)
            if not done:
                continue
            with self._cond:
                if self._closed:
                    return
                self._take(done[0])
                if not self._out:
                    self.busy_seconds += time.monotonic() - self._busy_since
                if self._error is None:
                    self._dispatch()
                self._cond.notify_all()
                if self._error is not None:
                    return

    def _take(self, ref: ray.ObjectRef) -> None:
        """A finished call's verdicts, its replica free again (the lock is held); a failed call is kept for collect
        to raise in the trainer's thread."""
        rank, keys = self._out.pop(ref)
        try:
            verdicts = self.group.get([ref], "judge", ranks=[rank])[0]
        except BaseException as err:  # noqa: BLE001 - raised again by collect
            self._error = err
            return
        self._verdicts.update(zip(keys, verdicts, strict=True))
        self._free.append(rank)
