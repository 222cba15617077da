"""One PolicyWorker (world size 1, gloo) through a step's calls, logging the order in which the actor's kinds and
the engine's memory parts move (launched by test_roles_policy.py).

usage: python policy_order_worker.py OUT_JSON CKPT_DIR [override ...]
The actor is the real MegatronActor and the engine the real EmbeddedEngine; the log comes from wrapping their
offload/onload and the engine's protocol methods, each entry with what the actor held at that moment.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.config import load_config, to_dict
from fapo_megatron.engine_protocol import Engine, SamplingParams
from fapo_megatron.megatron.actor import MegatronActor
from fapo_megatron.roles import policy

LOG: list[dict] = []
ACTORS: list[MegatronActor] = []


def held() -> list[str]:
    return sorted(ACTORS[0].resident_kinds) if ACTORS else []


def record(event: str, parts=()) -> None:
    LOG.append({"event": event, "parts": sorted(parts), "actor": held()})


def wrap_actor() -> None:
    init, offload, onload = MegatronActor.__init__, MegatronActor.offload, MegatronActor.onload

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        ACTORS.append(self)

    def logged_offload(self, kinds=("params", "grads", "optimizer")):
        moved = [k for k in kinds if k in self.resident_kinds]
        if moved:
            record("actor.offload", moved)
        offload(self, kinds)

    def logged_onload(self, kinds=("params", "grads", "optimizer")):
        moved = [k for k in kinds if k not in self.resident_kinds]
        if moved:
            record("actor.onload", moved)
        onload(self, kinds)

    MegatronActor.__init__, MegatronActor.offload, MegatronActor.onload = __init__, logged_offload, logged_onload


class Recorded(Engine):
    """The real engine, each protocol call logged before it runs."""

    def __init__(self, inner: Engine):
        self.inner = inner

    def start(self):
        record("engine.start")
        self.inner.start()

    def healthy(self):
        return self.inner.healthy()

    def generate(self, prompts, params):
        record("engine.generate")
        return self.inner.generate(prompts, params)

    def update_weights(self, buckets):
        record("engine.update_weights")
        self.inner.update_weights(buckets)

    def release_memory(self, tags=None):
        record("engine.release", tags or ())
        self.inner.release_memory(tags)

    def resume_memory(self, tags=None):
        record("engine.resume", tags or ())
        self.inner.resume_memory(tags)

    def shutdown(self):
        self.inner.shutdown()


def batch(seed: int = 0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    rows, seq = 4, 12
    mask = torch.zeros(rows, seq)
    mask[:, 4:] = 1.0
    return TrainBatch(
        tokens=torch.randint(0, 40, (rows, seq), generator=gen),
        lengths=torch.full((rows,), seq),
        response_mask=mask,
        advantages=torch.randn(rows, generator=gen),
        group_ids=torch.arange(rows) // 2,
        rollout_logprobs=-torch.rand(rows, seq, generator=gen) * mask,
    )


def main() -> None:
    out, ckpt, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    wrap_actor()
    build = policy.build_rollout_engine
    policy.build_rollout_engine = lambda *args, **kwargs: Recorded(build(*args, **kwargs))
    cfg = load_config(None, ["model.tiny=llama", "model.dtype=float32", "cluster.devices_per_node=1", *overrides])
    worker = policy.PolicyWorker(to_dict(cfg))
    result = {"init": list(LOG), "calls": []}

    def call(name, *args):
        start = len(LOG)
        value = getattr(worker, name)(*args)
        result["calls"].append([name, LOG[start:], worker.phase])
        return value

    call("sync_weights")  # the trainer's first push
    call("generate", [[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, n=2, seed=1))
    call("enter_genrm")
    train = batch()
    old, _ = call("compute_logprobs", train)
    call("train_step", dataclasses.replace(train, old_logprobs=old))
    call("sync_weights")
    result["ledger"] = worker.memory_ledger()
    call("save", ckpt, 1, {"step": 1})
    with open(out, "w") as f:
        json.dump(result, f)
    worker.close()


if __name__ == "__main__":
    main()
