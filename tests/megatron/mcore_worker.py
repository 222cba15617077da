"""One rank of a multi-process megatron test job (launched by test_megatron_actor.py with RANK/WORLD_SIZE/...).

usage: python mcore_worker.py SCENARIO WORKDIR
Reads the tiny HF checkpoints the test wrote under WORKDIR/hf_<family>, writes rank 0's results to
WORKDIR/out/<name>.pt. Several parallel layouts run one after another in the same processes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch
from megatron_testlib import make_batch  # the script's folder is on sys.path

from fapo_megatron.config import load_config
from fapo_megatron.megatron.actor import MegatronActor
from fapo_megatron.megatron.checkpoint import CheckpointMismatchError

WORKDIR = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def build(family: str, tp: int, pp: int, **extra) -> MegatronActor:
    settings = {
        "model.path": WORKDIR / ("hf_" + family),
        "model.dtype": "float32",
        "parallel.tp": tp,
        "parallel.pp": pp,
        "cluster.devices_per_node": WORLD,
        "rollout.n": 4,
        "data.batch_size": 2,
        "algorithm.mini_batch_size": 1,
        "optim.lr": 0.001,
        "optim.warmup_steps": 0,
        "trainer.steps": 4,
    }
    settings.update(extra)
    return MegatronActor(load_config(None, [f"{k}={v}" for k, v in settings.items()]))


def emit(name: str, value) -> None:
    if RANK == 0:
        (WORKDIR / "out").mkdir(exist_ok=True)
        torch.save(value, WORKDIR / "out" / f"{name}.pt")


def exported(actor: MegatronActor) -> dict[str, torch.Tensor]:
    return {name: t.clone().cpu() for bucket in actor.export_hf_weights(1 << 14) for name, t in bucket}


def full_moments(actor: MegatronActor) -> dict[str, torch.Tensor]:
    """Adam's exp_avg and exp_avg_sq of every model parameter as whole tensors: this rank's distributed-optimizer
    shard placed in the parameter's range, summed over DP, then the TP slices joined as the HF export joins the
    weights (models.hf_mapping.tp_gather; PP1 only)."""
    from megatron.core import parallel_state

    from fapo_megatron.models.hf_mapping import tp_gather

    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    out = {}
    for name, param in actor.model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros(param.numel())
            for opt in optimizers:
                if param in opt.model_param_group_index_map:
                    span = opt._get_model_param_range_map(param)["param"]
                    flat[span.start : span.end] = opt._get_main_param_and_optimizer_states(param)[key].float()
            torch.distributed.all_reduce(flat, group=dp_group)
            slices = [torch.empty_like(flat) for _ in range(actor.layout.tp)]
            torch.distributed.all_gather(slices, flat, group=tp_group)
            out[f"{name}.{key}"] = tp_gather(name, [piece.view(param.shape) for piece in slices])
    return out


def parity() -> None:
    """Log-probs of both families under every layout of 4 ranks; export and offload round trips at TP2 x PP2."""
    batch = make_batch()
    for family in ("qwen2", "qwen3"):
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            actor = build(family, tp, pp)
            logprobs, entropy = actor.compute_logprobs(batch, temperature=0.7)
            emit(f"parity_{family}_tp{tp}pp{pp}", {"logprobs": logprobs, "entropy": entropy})
            if (tp, pp) == (2, 2):
                emit(f"export_{family}", exported(actor))
                actor.offload()
                actor.onload()
                emit(f"onload_{family}", actor.compute_logprobs(batch, temperature=0.7)[0])
            actor.close()


def train() -> None:
    """One FAPO train step (two optimizer steps) under TP1, TP2 and PP2 from the same weights and data."""
    batch = make_batch()
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        actor = build("qwen2", tp, pp, **{"algorithm.tis_cap": 2.0})
        metrics = actor.train_step(batch)
        emit(f"train_tp{tp}pp{pp}", {"metrics": metrics, "weights": exported(actor)})
        actor.close()


def packing() -> None:
    """Padded vs packed micro-batches (token budget per layout) from the same weights: log-probs, then one train
    step with TIS and KL on, under every loss aggregation mode."""
    batch = make_batch()
    budgets = {(1, 1): 20, (2, 1): 14, (1, 2): 32}
    for (tp, pp), budget in budgets.items():
        for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            for packed in (0, budget):
                extra = {
                    "algorithm.tis_cap": 2.0,
                    "algorithm.kl_coef": 0.1,
                    "algorithm.loss_agg_mode": mode,
                    "parallel.max_tokens_per_micro_batch": packed,
                    # Adam's first step is ~lr * sign(g): with eps 1e-8 a gradient element near 1e-8 turns the
                    # round-off of a different row order over DP ranks into a 1e-5 weight difference
                    "optim.adam_eps": 1e-6,
                }
                actor = build("qwen2", tp, pp, **extra)
                logprobs = actor.compute_logprobs(batch)[0] if mode == "token-mean" else None
                metrics = actor.train_step(batch)
                shapes = [tuple(item["tokens"].shape) for item in actor._micro_batches(batch)[0]]
                result = {"logprobs": logprobs, "weights": exported(actor), "shapes": shapes, **metrics}
                emit(f"pack_tp{tp}pp{pp}_{mode}_{packed}", result)
                actor.close()


def checkpoint() -> None:
    """Save at TP2 after one step, then load at TP1 and PP2; a wrong-shape model must name the tensor."""
    batch = make_batch()
    root = WORKDIR / "ckpt"
    actor = build("qwen2", 2, 1)
    actor.train_step(batch)
    actor.save(root, 1, {"data_position": 7})
    emit("ckpt_tp2", actor.compute_logprobs(batch)[0])
    emit("ckpt_tp2_moments", full_moments(actor))
    emit("uninterrupted", actor.train_step(make_batch(1)))
    emit("uninterrupted_weights", exported(actor))
    actor.close()
    for tp, pp in ((1, 1), (1, 2)):
        actor = build("qwen2", tp, pp)
        extra = actor.load(root)
        result = {"logprobs": actor.compute_logprobs(batch)[0], "extra": extra}
        if pp == 1:  # saved at TP2 x DP1, loaded at TP1 x DP2: Adam's state resharded, the next step the same
            result["moments"] = full_moments(actor)
            result["next"] = actor.train_step(make_batch(1))
            result["next_weights"] = exported(actor)
        emit(f"ckpt_load_tp{tp}pp{pp}", result)
        actor.close()
    actor = build("qwen2_wide", 2, 1)
    try:
        actor.load(root)
        emit("ckpt_mismatch", "loaded without error")
    except CheckpointMismatchError as err:
        emit("ckpt_mismatch", str(err))
    actor.close()


SLOW_WRITE_S = 8.0


def _slow_shard_writes() -> None:
    """Every shard file write sleeps SLOW_WRITE_S first (in the forked writers, which inherit this)."""
    import functools
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data

    @functools.wraps(write)
    def slowed(*args, **kwargs):
        time.sleep(SLOW_WRITE_S)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(slowed)


def async_checkpoint() -> None:
    """DP2: the same step saved synchronously and in the background (slowed writers, fully-parallel save); training
    goes on while it writes, `latest` moves only once it is written, close waits for a pending one; both loads."""
    import time

    from fapo_megatron.megatron.checkpoint import save_strategy
    from fapo_megatron.megatron.checkpoint_files import complete_steps, pointer_target

    def on_disk(root: Path) -> dict:
        target = pointer_target(root)
        return {"complete": [s for s, _ in complete_steps(root)], "latest": target.name if target else None}

    batch = make_batch()
    actor = build("qwen2", 1, 1)
    emit("strategy_default", type(save_strategy(actor)).__name__)
    actor.train_step(batch)
    actor.save(WORKDIR / "sync_ckpt", 1, {"data_position": 3})
    actor.close()

    _slow_shard_writes()
    root = WORKDIR / "async_ckpt"
    actor = build("qwen2", 1, 1, **{"trainer.async_checkpoint": "true", "trainer.fully_parallel_save": "true"})
    strategy = save_strategy(actor)
    emit(
        "strategy_parallel",
        [type(strategy).__name__, torch.distributed.get_world_size(strategy.parallelization_group)],
    )
    actor.train_step(batch)
    start = time.perf_counter()
    actor.save(root, 1, {"data_position": 3})
    returned = time.perf_counter() - start
    while_writing = on_disk(root)
    actor.train_step(make_batch(1))  # changes the parameters in place while the writers run
    published = actor.finish_checkpoint()
    written = time.perf_counter() - start
    after_finish = on_disk(root)
    actor.save(root, 2, {"data_position": 5})
    second_writing = on_disk(root)
    actor.close()
    emit(
        "async_timeline",
        {
            "returned_s": returned,
            "written_s": written,
            "while_writing": while_writing,
            "published": published.name,
            "after_finish": after_finish,
            "second_writing": second_writing,
            "after_close": on_disk(root),
        },
    )
    for name, folder in (("sync", WORKDIR / "sync_ckpt"), ("async", root / "step_00000001")):
        actor = build("qwen2", 1, 1)
        extra = actor.load(folder)
        result = {"extra": extra, "weights": exported(actor), "moments": full_moments(actor)}
        result["next"] = actor.train_step(make_batch(1))
        result["next_weights"] = exported(actor)
        emit(f"resumed_{name}", result)
        actor.close()


def crash() -> None:
    """Train one step, checkpoint, then die without any clean-up (as a killed job would)."""
    actor = build("qwen2", 2, 1)
    actor.train_step(make_batch())
    actor.save(WORKDIR / "crash_ckpt", 1, {"data_position": 1})
    os.kill(os.getpid(), signal.SIGKILL)


def restart() -> None:
    actor = build("qwen2", 2, 1)
    extra = actor.load(WORKDIR / "crash_ckpt")
    emit(
        "restarted",
        {"metrics": actor.train_step(make_batch(1)), "extra": extra, "optimizer_steps": actor.optimizer_steps},
    )
    actor.close()


def non_finite() -> None:
    """A NaN advantage in each mini-batch, on DP rank 1's rows in the first and rank 0's in the second: stop leaves
    the weights as they were; skip counts both updates and leaves them too; a finite batch then updates as usual."""
    good = make_batch()
    advantages = good.advantages.clone()
    advantages[[2, 5]] = float("nan")
    poisoned = dataclasses.replace(good, advantages=advantages)
    for mode in ("stop", "skip"):
        actor = build("qwen2", 1, 1, **{"optim.on_non_finite": mode})
        before = exported(actor)
        try:
            metrics = actor.train_step(poisoned)
            outcome = {"skipped": metrics["skipped_non_finite"], "grad_norm": metrics["grad_norm"]}
        except FloatingPointError as err:
            outcome = {"error": str(err)}
        outcome["unchanged"] = all(torch.equal(before[k], v) for k, v in exported(actor).items())
        if mode == "skip":
            actor.train_step(good)
            outcome["changed_after_good"] = any(not torch.equal(before[k], v) for k, v in exported(actor).items())
        emit(f"non_finite_{mode}", outcome)
        actor.close()


def actor_options() -> None:
    """One train step (two optimizer steps) at DP2 under each DDP and log-prob option, from the same weights: the
    DDP wrapper megatron built (its config, buckets, gradient dtype, forward pre-hooks), the weights after the
    step and the log-probs then."""
    batch = make_batch()
    options = {
        "plain": {},
        "overlap_grad": {"parallel.overlap_grad_reduce": "true"},
        "small_buckets": {"parallel.overlap_grad_reduce": "true", "parallel.ddp_bucket_size": 4096},
        "overlap_both": {"parallel.overlap_grad_reduce": "true", "parallel.overlap_param_gather": "true"},
        "bf16_fp32_grads": {"model.dtype": "bfloat16"},
        "bf16_grads": {"model.dtype": "bfloat16", "parallel.grad_reduce_in_fp32": "false"},
        "chunked": {"parallel.logprob_chunk_tokens": 5},
        "entropy": {"algorithm.entropy_coef": 0.05},
        "entropy_chunked": {"algorithm.entropy_coef": 0.05, "parallel.logprob_chunk_tokens": 5},
    }
    for name, extra in options.items():
        actor = build("qwen2", 1, 1, **{"algorithm.tis_cap": 2.0, **extra})
        ddp = actor.ddp
        built = {
            "ddp_config": dataclasses.asdict(ddp.ddp_config),
            "bucket_groups": len(ddp.bucket_groups),
            "grad_dtypes": sorted({str(buffer.grad_data.dtype) for buffer in ddp.buffers}),
            "forward_pre_hooks": len(ddp.remove_forward_pre_hook_handles),
        }
        before = exported(actor)
        metrics = actor.train_step(batch)
        after = exported(actor)
        moved = max((after[k].float() - before[k].float()).abs().max().item() for k in after)
        logprobs = actor.compute_logprobs(batch)[0]
        emit(f"options_{name}", {**built, "metrics": metrics, "weights": after, "moved": moved, "logprobs": logprobs})
        actor.close()


if __name__ == "__main__":
    scenarios = {"parity": parity, "train": train, "checkpoint": checkpoint, "crash": crash, "restart": restart}
    scenarios.update(non_finite=non_finite, packing=packing, actor_options=actor_options)
    scenarios.update(async_checkpoint=async_checkpoint)
    scenarios[sys.argv[1]]()
