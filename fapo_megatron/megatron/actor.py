"""The policy actor: one object per rank, training the policy with megatron-core under TP x PP x DP.

Every public method takes the FULL global batch on every rank and returns full results on every rank; each rank
works on its data-parallel shard, and pipeline stages run Megatron's schedules (1F1B for pp > 1).

Loss scaling, exactly a single-process step: each micro-batch's loss is the FAPO/PPO loss of its rows divided by
the mini-batch's GLOBAL token (or sequence) count N, so the micro-batch losses of all DP ranks sum to the
mini-batch loss. Megatron is run in per-token-loss mode: the loss function returns (loss * N, local count n),
gradients are summed (not averaged) over DP and finally divided by sum(n) = N.

Legend: B rows of a batch, S padded sequence length, V_r vocabulary rows of this TP rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from fapo_megatron.algo import ppo_loss
from fapo_megatron.algo.batch import TrainBatch
from fapo_megatron.config import Config
from fapo_megatron.megatron import model as mcore
from fapo_megatron.megatron import platform
from fapo_megatron.megatron.logprobs import align_to_tokens, vocab_parallel_logprobs
from fapo_megatron.megatron.offload import KINDS, StateOffloader
from fapo_megatron.megatron.packing import packed_micro_batches, padded_micro_batches, unpack
from fapo_megatron.models import hf_mapping, registry
from fapo_megatron.models.spec import ModelSpec, model_spec, tiny_hf_config

logger = logging.getLogger(__name__)
_LOSS_METRICS = ("pg_loss", "kl_loss", "entropy_loss")
_SUM_METRICS = ("pg_loss", "kl_loss", "entropy_loss", "local_num_tokens", "local_num_sequences")
_MAX_METRICS = ("tis_ratio_max",)


def policy_hf_config(cfg: Config) -> dict:
    """The policy's HF config: model.path's config.json, else the Megatron checkpoint's, else the random tiny one
    (also what a rollout engine on its own pool builds its model from)."""
    if cfg.model.path:
        return json.loads((Path(cfg.model.path) / "config.json").read_text())
    if cfg.model.megatron_checkpoint:
        from fapo_megatron.megatron.checkpoint import checkpoint_hf_config

        return checkpoint_hf_config(cfg.model.megatron_checkpoint)
    return tiny_hf_config(cfg.model.tiny)


class MegatronActor:
    """The trained policy on this rank. Build it on every rank of the job with the same `cfg`."""

    def __init__(self, cfg: Config, *, hf_config: dict | None = None, total_steps: int | None = None):
        self.cfg = cfg
        par = cfg.parallel
        platform.setup(cfg.cluster.device)
        self.layout = mcore.init_model_parallel(par.tp, par.pp, cfg.trainer.seed)
        self.hf_config = policy_hf_config(cfg) if hf_config is None else hf_config
        self.spec = model_spec(self.hf_config)
        self.backend = registry.resolve_backend("auto")
        """The layer spec built (local or Transformer Engine); the HF name map follows it."""
        self.mapping = hf_mapping.MappingSpec.for_tp(
            self.spec, par.tp, registry.parameter_renames(self.spec, self.backend)
        )
        self.mapping.check_tp(par.tp)
        self.config = actor_transformer_config(cfg, self.spec, self.backend)
        self.model = mcore.build_gpt_model(self.spec, self.config, self.layout, self.backend)
        if cfg.model.path:
            self._load_hf_weights(Path(cfg.model.path))
        self.ddp = mcore.wrap_ddp(self.model, self.config, par)
        self.optimizer = mcore.build_optimizer(self.ddp, cfg.optim, cfg.model.dtype, par)
        self.mini_batches_per_epoch = cfg.data.batch_size // cfg.algorithm.mini_batch_size
        """Optimizer steps per PPO epoch of one trainer step, also when dropped rollouts leave fewer rows."""
        if total_steps is None:
            total_steps = cfg.trainer.steps * self.mini_batches_per_epoch * cfg.algorithm.ppo_epochs
        self.scheduler = mcore.build_scheduler(self.optimizer, cfg.optim, total_steps)
        self.config.no_sync_func = self.ddp.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss if cfg.model.dtype == "float16" else None
        self.optimizer_steps = 0
        """Optimizer steps taken: the LR schedule's position (saved in checkpoints; the trainer's step names them)."""
        self._offloader = StateOffloader(self.ddp, self.optimizer)
        self.pending_checkpoint = None  # a background save not yet published (megatron.checkpoint.PendingSave)
        if cfg.model.megatron_checkpoint:
            self.load(cfg.model.megatron_checkpoint)

    # ------------------------------------------------------------------------------------------ weights

    def _load_hf_weights(self, folder: Path) -> None:
        """Load this rank's TP slices of its pipeline stage's tensors, reading only those from safetensors."""
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {folder}")
            weight_map = {}
            for file in files:
                with safe_open(file, "pt", device="cpu") as handle:
                    weight_map.update({name: file.name for name in handle.keys()})
        handles = {}

        def read(name: str) -> torch.Tensor:
            if name not in weight_map:
                raise KeyError(f"{folder}: tensor {name!r} not found in the checkpoint")
            file = weight_map[name]
            if file not in handles:
                handles[file] = safe_open(folder / file, "pt", device="cpu")
            return handles[file].get_tensor(name)

        state = hf_mapping.rank_state_dict(
            read,
            self.mapping,
            tp=self.layout.tp,
            tp_rank=self.layout.tp_rank,
            pp=self.layout.pp,
            pp_stage=self.layout.pp_rank,
        )
        self.load_megatron_state(state, source=str(folder))

    def load_megatron_state(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Copy this rank's (stage-local, TP-sliced) tensors into the model; every parameter must be covered."""
        params = dict(self.model.named_parameters())
        missing = [name for name in params if name not in state]
        if missing:
            raise KeyError(f"{source}: no weights for model parameter(s) {missing[:4]}")
        with torch.no_grad():
            for name, tensor in state.items():
                if name not in params:
                    raise KeyError(f"{source}: tensor {name!r} has no parameter in this stage's model")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"model expects {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)

    def export_hf_weights(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield buckets of (HF name, full tensor) of at most `bucket_bytes` (one tensor may exceed it alone),
        gathered across TP and broadcast from the owning pipeline stage; every rank must iterate it fully."""
        bucket, size = [], 0
        for name, tensor in self._iter_hf_tensors():
            if bucket and size + tensor.numel() * tensor.element_size() > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
        if bucket:
            yield bucket

    def _iter_hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        lay, spec = self.layout, self.mapping
        params = dict(self.model.named_parameters())
        tp_group = parallel_state.get_tensor_model_parallel_group()
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp_ranks = dist.get_process_group_ranks(pp_group)
        for mapping in hf_mapping.build_mappings(spec):
            stage = mapping.pp_stage(spec.model.num_layers, lay.pp)
            if lay.pp_rank == stage:
                local = params[hf_mapping.localize_name(mapping.megatron_name, spec.model.num_layers, lay.pp)].detach()
                shards = [torch.empty_like(local) for _ in range(lay.tp)]
                dist.all_gather(shards, local.contiguous(), group=tp_group)
                full = hf_mapping.tp_gather(mapping.megatron_name, shards)
            else:
                full = torch.empty(mapping.shape, dtype=self.config.params_dtype, device=platform.device())
            if lay.pp > 1:
                dist.broadcast(full, src=pp_ranks[stage], group=pp_group)
            yield from zip(mapping.hf_names, hf_mapping.to_hf(mapping, full, spec))

    # ------------------------------------------------------------------------------------------ forward

    def _micro_batches(self, batch: TrainBatch) -> tuple[list[dict], int]:
        """This DP rank's micro-batches (see megatron/packing.py) and their longest sequence length."""
        lay, par = self.layout, self.cfg.parallel
        multiple = lay.tp if par.sequence_parallel else 1
        where = dict(dp=lay.dp, dp_rank=lay.dp_rank, multiple=multiple, device=platform.device())
        if par.max_tokens_per_micro_batch:
            return packed_micro_batches(batch, budget=par.max_tokens_per_micro_batch, **where)
        return padded_micro_batches(batch, rows_per_micro_batch=par.micro_batch_size, **where)

    def _forward_step(self, loss_func, data_iterator, model):
        item = next(data_iterator)
        output = model(item["tokens"], item["position_ids"], None, packed_seq_params=item.get("packed_seq_params"))
        return output, partial(loss_func, item)

    def _token_logprobs(self, item: dict, logits_BSV: torch.Tensor, temperature: float, entropy_grad: bool = False):
        targets = torch.nn.functional.pad(item["tokens"][:, 1:], (0, 1))
        logprobs, entropy = vocab_parallel_logprobs(
            logits_BSV,
            targets,
            temperature=temperature,
            vocab_size=self.spec.vocab_size,
            entropy_grad=entropy_grad,
            chunk_tokens=self.cfg.parallel.logprob_chunk_tokens,
        )
        return unpack(item, align_to_tokens(logprobs)), unpack(item, align_to_tokens(entropy))

    def _run(self, micro: list[dict], seq: int, loss_func, forward_only: bool) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func),
            data_iterator=iter(micro),
            model=[self.ddp],
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=len(micro[0]["tokens"]),
            forward_only=forward_only,
        )

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy), each [B, S] float32 on CPU, of softmax(logits / temperature); position t is about
        token t given tokens[:t]; 0 at column 0 and on padding."""
        lay = self.layout
        micro, seq = self._micro_batches(batch)

        def collect(item, logits):
            logprobs, entropy = self._token_logprobs(item, logits, temperature)
            return logits.new_zeros(()), {"logprobs": logprobs, "entropy": entropy}

        self.ddp.eval()
        store = self._run(micro, seq, collect, forward_only=True)
        self.ddp.train()
        # every row is computed on one DP rank: the others add zeros
        out = torch.zeros(2, len(batch), batch.tokens.shape[1], device=platform.device())
        for item, values in zip(micro, store if lay.is_last_stage else []):
            real = item["rows"] >= 0
            both = torch.stack([values["logprobs"], values["entropy"]])[:, real]
            width = min(both.shape[2], out.shape[2])
            out[:, item["rows"][real].to(out.device), :width] = both[:, :, :width]
        if lay.pp > 1:
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        out = out.cpu()
        valid = batch.attention_mask.clone()
        valid[:, 0] = False
        out = out * valid.to(out.dtype)
        return out[0], out[1]

    # ------------------------------------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """PPO/FAPO update on `batch`: ppo_epochs passes of `mini_batches_per_epoch` mini-batches (mini_batch_size x
        rollout.n rows each; smaller, never fewer, when rollouts were dropped, so the LR schedule's count holds);
        returns metrics averaged over the optimizer steps (lr: the last one's)."""
        if batch.old_logprobs is None:
            old, _ = self.compute_logprobs(batch, self.cfg.rollout.temperature)
            batch = dataclasses.replace(batch, old_logprobs=old)
        algo = self.cfg.algorithm
        if algo.kl_coef > 0 and batch.ref_logprobs is None and batch.rollout_logprobs is not None:
            batch = dataclasses.replace(batch, ref_logprobs=batch.rollout_logprobs)
        history = []
        for _ in range(algo.ppo_epochs):
            for mini in batch.split(self.mini_batches_per_epoch):
                history.append(self._train_mini_batch(mini))
                self.optimizer_steps += 1
        if self.cfg.parallel.overlap_param_gather:
            # the last update left each rank with its own shard only (the next forward would gather the rest):
            # export, checkpoints and the log-prob pass need whole parameters
            self.ddp.start_param_sync(force_sync=True)
        out = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        out["lr"] = history[-1]["lr"]
        applied = [h["grad_norm"] for h in history if not h["skipped_non_finite"]]
        out["grad_norm"] = sum(applied) / len(applied) if applied else math.nan
        out["skipped_non_finite"] = sum(h["skipped_non_finite"] for h in history)
        out["optimizer_steps"] = float(len(history))
        return out

    def _train_mini_batch(self, mini: TrainBatch) -> dict[str, float]:
        algo = self.cfg.algorithm
        token_mean = algo.loss_agg_mode == "token-mean"
        normaliser = mini.num_response_tokens if token_mean else mini.num_response_sequences
        # Rollouts dropped by the unavailable-verdict policy leave uneven mini-batches: padded with uncounted rows.
        micro, seq = self._micro_batches(mini)
        loss_func = partial(self._ppo_loss_func, max(normaliser, 1), token_mean)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self._run(micro, seq, loss_func, forward_only=False)
        metrics = self._reduce_metrics(store)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if not self._update_is_finite(metrics):
            return self._non_finite_update(metrics)
        self.scheduler.step(increment=1)
        _, grad_norm, _ = self.optimizer.step()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["skipped_non_finite"] = 0.0
        return metrics

    def _update_is_finite(self, metrics: dict[str, float]) -> bool:
        """Loss and every rank's gradients finite? (A NaN or inf gradient anywhere makes the global norm
        non-finite, and Megatron's clipping would then write NaN into every weight.) Same answer on every rank."""
        bad = any(not math.isfinite(metrics[name]) for name in _LOSS_METRICS if name in metrics)
        for buffer in self.ddp.buffers + self.ddp.expert_parallel_buffers:
            bad = bad or not bool(torch.isfinite(buffer.grad_data).all())
        flag = torch.tensor([1.0 if bad else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _non_finite_update(self, metrics: dict[str, float]) -> dict[str, float]:
        """optim.on_non_finite: stop before the update (weights, optimizer and checkpoints stay as they were), or
        skip it and count it."""
        losses = ", ".join(f"{name} {metrics[name]:.4g}" for name in _LOSS_METRICS if name in metrics)
        if self.cfg.optim.on_non_finite == "stop":
            raise FloatingPointError(
                f"optimizer step {self.optimizer_steps + 1}: non-finite loss or gradient ({losses}); the update was "
                "not applied and the last checkpoint is intact (optim.on_non_finite=skip skips such updates instead)"
            )
        logger.warning(
            "optimizer step %d: non-finite loss or gradient (%s); update skipped", self.optimizer_steps + 1, losses
        )
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics["grad_norm"] = float("nan")
        metrics["skipped_non_finite"] = 1.0
        return metrics

    def _ppo_loss_func(self, normaliser: int, token_mean: bool, item: dict, logits_BSV: torch.Tensor):
        algo = self.cfg.algorithm
        logprobs, entropy = self._token_logprobs(
            item, logits_BSV, self.cfg.rollout.temperature, entropy_grad=algo.entropy_coef > 0
        )
        loss, metrics = ppo_loss(
            logprobs,
            item["old_logprobs"].float(),
            item["advantages"].float(),
            item["response_mask"].float(),
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip_c=algo.dual_clip_c,
            loss_agg_mode=algo.loss_agg_mode,
            num_tokens=normaliser,
            num_sequences=normaliser,
            rollout_logprobs=item["rollout_logprobs"],
            tis_cap=algo.tis_cap,
            kl_coef=algo.kl_coef,
            kl_type=algo.kl_type,
            ref_logprobs=item["ref_logprobs"],
            entropy=entropy if algo.entropy_coef > 0 else entropy.detach(),
            entropy_coef=algo.entropy_coef,
        )
        local = metrics["local_num_tokens" if token_mean else "local_num_sequences"]
        logged = {k: v.detach().clone().float() for k, v in metrics.items()}
        return loss * normaliser, local.round().to(torch.int), logged

    def _reduce_metrics(self, store: list[dict]) -> dict[str, float]:
        """Combine per-micro-batch metrics over micro-batches and DP ranks; identical on every rank."""
        lay = self.layout
        names = sorted(store[0]) if store else []
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if lay.pp > 1:
            names = _broadcast_names(names, src, pp_group)
        count = len(names)
        sums = torch.zeros(count, device=platform.device())
        maxima = torch.zeros(count, device=platform.device())
        for item in store:
            tokens = item["local_num_tokens"]
            for i, name in enumerate(names):
                value = item[name]
                sums[i] += value if name in _SUM_METRICS else value * tokens
                maxima[i] = torch.maximum(maxima[i], value)
        dp_group = parallel_state.get_data_parallel_group()
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=dp_group)
        if lay.pp > 1:
            dist.broadcast(sums, src=src, group=pp_group)
            dist.broadcast(maxima, src=src, group=pp_group)
        tokens = max(float(sums[names.index("local_num_tokens")]), 1.0)
        out = {}
        for i, name in enumerate(names):
            if name in _MAX_METRICS:
                out[name] = float(maxima[i])
            elif name in _SUM_METRICS:
                out[name] = float(sums[i])
            else:
                out[name] = float(sums[i]) / tokens
        out["loss"] = out.get("pg_loss", 0.0) + self.cfg.algorithm.kl_coef * out.get("kl_loss", 0.0)
        out["loss"] -= self.cfg.algorithm.entropy_coef * out.get("entropy_loss", 0.0)
        return out

    # ------------------------------------------------------------------------------------------ state

    def offload(self, kinds: tuple[str, ...] = KINDS) -> None:
        """Free `kinds` (params, grads, optimizer) from the device: gradients dropped, the rest to CPU memory."""
        self._offloader.offload(kinds)

    def onload(self, kinds: tuple[str, ...] = KINDS) -> None:
        """Bring `kinds` back; the next step sees exactly the state it left."""
        self._offloader.onload(kinds)

    @property
    def resident_kinds(self) -> set[str]:
        return set(self._offloader.resident)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state in device memory now, from the storages."""
        return self._offloader.resident_bytes()

    def save(self, directory: str | Path, step: int, extra_state: dict | None = None) -> Path:
        """Checkpoint as `step_<step>` (the trainer's step) under `directory`."""
        from fapo_megatron.megatron.checkpoint import save_checkpoint

        return save_checkpoint(self, directory, step, extra_state or {})

    def load(self, directory: str | Path) -> dict:
        from fapo_megatron.megatron.checkpoint import load_checkpoint

        return load_checkpoint(self, directory)

    def finish_checkpoint(self, *, blocking: bool = True) -> Path | None:
        """Publish a background save once written (megatron.checkpoint.finish_checkpoint); every rank calls it."""
        from fapo_megatron.megatron.checkpoint import finish_checkpoint

        return finish_checkpoint(self, blocking=blocking)

    def close(self) -> None:
        """Wait for a background save, then tear down megatron's process groups (the torch.distributed world
        stays)."""
        self.finish_checkpoint()
        mcore.destroy_model_parallel()


def actor_transformer_config(cfg: Config, spec: ModelSpec, backend: str = "local"):
    """The actor's megatron-core TransformerConfig: parallel layout, dtype, recompute and fusions from `cfg`; with
    the Transformer Engine spec (fused norm + linear) also TE's RoPE fusion, and gradient-accumulation fusion where
    its kernel (fused_weight_gradient_mlp_cuda) imports."""
    par, on_cuda = cfg.parallel, cfg.cluster.device == "cuda"
    with_te = on_cuda and backend == "te"
    grad_accum_fusion = with_te and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    return registry.transformer_config(
        spec,
        tp=par.tp,
        pp=par.pp,
        dtype=cfg.model.dtype,
        sequence_parallel=par.sequence_parallel,
        initialize_weights=not cfg.model.path,
        calculate_per_token_loss=True,
        recompute=par.recompute,
        recompute_num_layers=par.recompute_num_layers,
        # megatron's torch-compiled SwiGLU and bias-dropout-add: +13 % tokens/s on an H200 (RESULTS.md)
        bias_activation_fusion=on_cuda,
        bias_dropout_fusion=on_cuda,
        apply_rope_fusion=with_te,
        gradient_accumulation_fusion=grad_accum_fusion,
        # packs differ in length: pipeline stages exchange each one's shape first (megatron refuses that with
        # its default MoE dispatcher even in a dense model; alltoall is inert without experts)
        variable_seq_lengths=par.max_tokens_per_micro_batch > 0,
        moe_token_dispatcher_type="alltoall",
    )


def _broadcast_names(names: list[str], src: int, group) -> list[str]:
    box = [names]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
