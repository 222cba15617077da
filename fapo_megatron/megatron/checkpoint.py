"""Distributed checkpoints of the actor: model, optimizer, LR schedule, RNG, step and the caller's extra state.

Layout of a checkpoint root:
    <root>/latest                 name of the newest complete checkpoint (replaced atomically)
    <root>/step_00000012/         megatron dist_checkpointing shards (model + optimizer)
                       meta.json  step, parallel layout, HF config, scheduler state
                       extra.pt   the caller's extra state (e.g. the data position)
                       rng/rank<r>.pt  this rank's RNG states (restored when the layout is unchanged)
                       checksums.json  CRC-32 and size of every file (verified before a load)
A checkpoint is written into `step_N.tmp` and renamed when every rank has finished, so a crash never leaves a
half-written checkpoint behind `latest`; with trainer.async_checkpoint a forked process writes the shards while
training goes on, and the rename (checksums, then the folder, then `latest`) waits until every rank's writer is
done: finish_checkpoint, called by the next save or load, the trainer after each step and at its end, and
actor.close. Loads take the newest complete step folder (checkpoint_files.py), `latest` being only a hint.
Model weights and optimizer state reshard to any TP/PP/DP on load: the distributed optimizer writes megatron's
`fully_reshardable` format (each parameter's Adam state as a tensor of that parameter's shape, gathered over DP on
save). Checkpoints written in the older `dp_reshardable` format (meta.json without `optimizer_format`) reshard over DP
only; loaded at another TP/PP they restart the moments, and say so.
A checkpoint whose meta.json says `weights_only` (what `fapo-megatron convert hf-to-megatron` writes) holds only the
model: loading it sets the weights and leaves optimizer, LR schedule, RNG and step as a fresh actor has them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

from fapo_megatron.lifetime import exit_with_parent
from fapo_megatron.megatron.checkpoint_files import (
    LATEST,
    CheckpointError,
    resolve_checkpoint,
    torch_save,
    verify_checksums,
    write_checksums,
)

logger = logging.getLogger(__name__)

OPTIMIZER_FORMAT = "fully_reshardable"
"""megatron's DistributedOptimizer sharding type this code writes; meta.json records it (absent: dp_reshardable)."""
_writer_manager: SyncManager | None = None


def _writer_results_queue_dies_with_this_process() -> None:
    """megatron-core's torch_dist writer collects its results through a multiprocessing Manager server it starts on
    the first save and keeps for the process's life; a SIGKILLed rank would leave that server (and its resource
    tracker) running for good. Give the writer its queue from a Manager of ours whose server exits once this process
    is gone (`filesystem_async` reads the queue from this module global, filled on first use)."""
    global _writer_manager
    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(exit_with_parent, (os.getpid(),))
    _writer_manager = manager  # kept: the server stops when the manager object is collected
    filesystem_async._results_queue = manager.Queue()


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds another model: the message names the first tensor that differs."""


def _layout(actor) -> dict:
    lay = actor.layout
    distributed = actor.cfg.parallel.use_distributed_optimizer
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "distributed_optimizer": distributed}


def _sharded_state(actor, *, is_loading: bool, with_optimizer: bool, optimizer_format: str = OPTIMIZER_FORMAT):
    model_state = actor.model.sharded_state_dict(prefix="")
    state = {"model": model_state}
    if with_optimizer:
        if is_loading:
            _init_optimizer_state(actor.optimizer)
        metadata = {"distrib_optim_sharding_type": optimizer_format}
        state["optimizer"] = actor.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    return state


def _init_optimizer_state(optimizer) -> None:
    """Create zero Adam moments and step so a fresh optimizer has the structure the checkpoint fills in."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step counter equal to its group's saved step.

    megatron-core (without apex/TE) restores torch Adam's per-parameter `step` as ONE tensor shared by all
    parameters (torch then advances it once per parameter per step) and, for an already initialised state,
    leaves the per-parameter steps at their template value; either breaks Adam's bias correction on resume."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                inner.state[param]["step"] = torch.tensor(float(group["step"]))


def _load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict, with the distributed optimizer's model-space parameter state loaded apart.

    With torch's Adam (no apex/TE) megatron-core gives every parameter's state a `step` and then copies the saved
    state over each of its keys, `step` among them, which the fully-reshardable format does not hold (KeyError).
    So the rest loads first, then the parameter state with `step` held aside; _restore_adam_steps sets it."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(optimizers) == 1:
        states = [state]
    else:
        states = [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
    for opt, opt_state in zip(optimizers, states):
        if opt_state.get("param_state_sharding_type") != "fully_reshardable":
            opt.load_state_dict(opt_state)
            continue
        opt.load_state_dict({k: v for k, v in opt_state.items() if k != "param_state"})
        steps = {param: per_param.pop("step", None) for param, per_param in opt.optimizer.state.items()}
        opt.load_parameter_state_from_fully_reshardable(opt_state["param_state"])
        for param, step in steps.items():
            if step is not None:
                opt.optimizer.state[param]["step"] = step


@dataclasses.dataclass
class PendingSave:
    """A checkpoint whose shards a forked writer is still writing into `tmp`; finish_checkpoint publishes it."""

    request: AsyncRequest
    writer: multiprocessing.Process | None  # None: this rank has no shard to write
    root: Path
    final: Path


def save_strategy(actor):
    """The sharded save strategy trainer.fully_parallel_save names: megatron's default (torch_dist), or that
    wrapped so the DP ranks split the writing of replicated shards among them."""
    strategy = get_default_save_sharded_strategy()
    if actor.cfg.trainer.fully_parallel_save:
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        strategy = FullyParallelSaveStrategyWrapper(strategy, group, do_cache_distribution=True)
    return strategy


def save_checkpoint(actor, root: str | Path, step: int, extra_state: dict) -> Path:
    """Write the actor's state under `root` as step_<step> (the trainer's step); returns the checkpoint folder.

    With trainer.async_checkpoint the shards are written by a forked process and this returns once it has started:
    the folder appears (and `latest` names it) when finish_checkpoint sees every rank's writer done. A save first
    finishes the one before it."""
    finish_checkpoint(actor)
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = _tmp(final)
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    _writer_results_queue_dies_with_this_process()
    torch_save(_rng_state(), tmp / "rng" / f"rank{dist.get_rank()}.pt")
    if rank0:
        meta = {
            "step": step,
            "optimizer_steps": actor.optimizer_steps,
            "layout": _layout(actor),
            "optimizer_format": OPTIMIZER_FORMAT,
            "hf_config": actor.hf_config,
            "scheduler": actor.scheduler.state_dict(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        torch_save(extra_state, tmp / "extra.pt")
    state = _sharded_state(actor, is_loading=False, with_optimizer=True)
    if not actor.cfg.trainer.async_checkpoint:
        dist_checkpointing.save(state, str(tmp), sharded_strategy=save_strategy(actor))
        _publish(root, final)
        return final
    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=save_strategy(actor), async_sharded_save=True)
    actor.pending_checkpoint = PendingSave(request, _start_writer(request), root, final)
    return final


def _tmp(final: Path) -> Path:
    return final.parent / (final.name + ".tmp")


def _start_writer(request: AsyncRequest) -> multiprocessing.Process | None:
    """Fork the process that writes this rank's shards. The fork's memory is the state as it is now, so training
    may change the parameters in place meanwhile; device tensors are first copied to host (megatron's preload)."""
    if request.async_fn is None:
        return None
    args = list(request.async_fn_args)
    if request.preload_fn is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        args[1] = request.preload_fn()
    writer = multiprocessing.get_context("fork").Process(
        target=_write_unless_orphaned, args=(os.getpid(), request.async_fn, args, request.async_fn_kwargs)
    )
    writer.start()
    return writer


def _write_unless_orphaned(parent_pid: int, write, args, kwargs) -> None:
    """The writer stops once its rank is gone (a killed rank's half-written folder is never published)."""
    exit_with_parent(parent_pid)
    write(*args, **kwargs)


def finish_checkpoint(actor, *, blocking: bool = True) -> Path | None:
    """Publish the background save once every rank's writer is done (all ranks call this together); returns its
    folder, or None when none was pending or, not blocking, a writer is still running. A writer that failed
    raises on every rank and leaves `latest` where it was."""
    pending = getattr(actor, "pending_checkpoint", None)
    if pending is None:
        return None
    writer = pending.writer
    if not blocking:
        running = [writer is not None and writer.is_alive()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, running)
        if any(flag for (flag,) in everyone):
            return None
    if writer is not None:
        writer.join()
    failed = [f"rank {dist.get_rank()}: writer exit code {writer.exitcode}"] if writer and writer.exitcode else []
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failed)
    actor.pending_checkpoint = None
    failures = [line for lines in everyone for line in lines]
    if failures:
        raise CheckpointError(f"{_tmp(pending.final)}: background checkpoint write failed ({'; '.join(failures)})")
    for finalize in pending.request.finalize_fns:  # megatron's global metadata (.metadata, metadata.json)
        finalize()
    _publish(pending.root, pending.final)
    return pending.final


def _publish(root: Path, final: Path) -> None:
    """After every rank's files are in `final`.tmp: checksums, the rename that makes the folder complete, then
    `latest`."""
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = _tmp(final)
        write_checksums(tmp)
        replaced = root / (final.name + ".old")
        if final.exists():  # the same step saved again: the old copy stays complete until the new one is in place
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        shutil.rmtree(replaced, ignore_errors=True)
    dist.barrier()


def _verify_on_rank0(folder: Path) -> None:
    """Rank 0 checks the files' checksums; every rank raises the same error when one differs."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            verify_checksums(folder)
        except CheckpointError as err:
            error = [str(err)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(error[0])


def checkpoint_hf_config(path: str | Path) -> dict:
    """The HF config.json contents a checkpoint (folder or root) was written for, from its meta.json."""
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / "meta.json").read_text())
    if not meta.get("hf_config"):
        raise KeyError(f"{folder / 'meta.json'}: no 'hf_config' entry")
    return meta["hf_config"]


_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _check_compatible(actor, folder: Path) -> None:
    """Raise naming the first model tensor whose key or global shape the checkpoint does not match."""
    saved = dist_checkpointing.load_tensors_metadata(str(folder))
    wanted, _ = extract_sharded_tensors(actor.model.sharded_state_dict(prefix=""))
    for item in wanted.values():
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in saved:
            raise CheckpointMismatchError(f"{folder}: the checkpoint has no tensor {item.key!r} (another model?)")
        saved_shape, shape = tuple(saved[item.key].global_shape), tuple(item.global_shape)
        if saved_shape == shape:
            continue
        hint = ""
        if item.key in _VOCAB_KEYS and saved_shape[1:] == shape[1:]:
            hint = (
                f" (vocabulary padding differs: the actor pads vocab_size={actor.spec.vocab_size} to {shape[0]} rows "
                f"for tp={actor.layout.tp}, models.spec.ModelSpec.padded_vocab_size; convert with the default "
                f"--vocab-divisible-by or a matching one)"
            )
        raise CheckpointMismatchError(
            f"{folder}: tensor {item.key!r} has shape {saved_shape} in the checkpoint, the model expects {shape}{hint}"
        )


def _load_model(actor, folder: Path, *, with_optimizer: bool, optimizer_format: str = OPTIMIZER_FORMAT) -> dict:
    """Load the model (and optionally optimizer) state into the actor; returns the loaded state dict."""
    wanted = _sharded_state(actor, is_loading=True, with_optimizer=with_optimizer, optimizer_format=optimizer_format)
    state = dist_checkpointing.load(wanted, str(folder))
    missing, _ = actor.model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointMismatchError(f"{folder}: no value for model tensor(s) {missing[:4]}")
    return state


def _load_weights_only(actor, folder: Path, meta: dict) -> dict:
    """Model weights from a weights-only checkpoint; the optimizer's main params follow, nothing else changes."""
    _load_model(actor, folder, with_optimizer=False)
    with torch.no_grad():  # fp32 main params are views of (or copies of) the model's leaf parameters
        actor.optimizer.reload_model_params()
    logger.info(
        "%s: weights-only checkpoint (converted from %s): model weights loaded; optimizer state, LR schedule, "
        "RNG and step start fresh (step %d)",
        folder,
        meta.get("converted_from", "?"),
        actor.optimizer_steps,
    )
    dist.barrier()
    return {}


def load_checkpoint(actor, path: str | Path) -> dict:
    """Restore the actor from a checkpoint (folder or root with `latest`); returns the saved extra state ({} for a
    weights-only checkpoint, which restores the model weights only)."""
    finish_checkpoint(actor)
    folder = resolve_checkpoint(path)
    _verify_on_rank0(folder)
    meta = json.loads((folder / "meta.json").read_text())
    _check_compatible(actor, folder)
    if meta.get("weights_only"):
        return _load_weights_only(actor, folder, meta)
    same_layout = meta["layout"] == _layout(actor)
    saved_format = meta.get("optimizer_format", "dp_reshardable")
    distributed = meta["layout"]["distributed_optimizer"]
    if distributed != actor.cfg.parallel.use_distributed_optimizer:
        with_optimizer = False  # the two optimizers' state dicts have different structures
    else:
        reshardable = not distributed or saved_format == OPTIMIZER_FORMAT
        with_optimizer = same_layout or reshardable or _only_dp_changed(meta["layout"], _layout(actor))
    if not with_optimizer:
        logger.warning(
            "%s: saved with %s (%s), loading with %s: that optimizer state does not reshard to this layout; "
            "optimizer moments restart from zero",
            folder,
            meta["layout"],
            saved_format,
            _layout(actor),
        )
    state = _load_model(actor, folder, with_optimizer=with_optimizer, optimizer_format=saved_format)
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        if with_optimizer:
            _load_optimizer_state(actor.optimizer, state["optimizer"])
            _restore_adam_steps(actor.optimizer)
        else:
            actor.optimizer.reload_model_params()
    actor.scheduler.load_state_dict(meta["scheduler"])
    actor.optimizer_steps = meta.get("optimizer_steps", meta["step"])  # older checkpoints: one counter
    rng_file = folder / "rng" / f"rank{dist.get_rank()}.pt"
    if same_layout and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    dist.barrier()
    return torch.load(folder / "extra.pt", weights_only=False)


def _only_dp_changed(saved: dict, current: dict) -> bool:
    return all(saved[k] == current[k] for k in ("tp", "pp", "distributed_optimizer"))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
