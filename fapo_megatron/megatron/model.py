"""Construction of the megatron-core objects: process groups, the GPT model of this pipeline stage, its DDP
wrapper, the optimizer and the LR schedule.

All megatron-core constructor calls live here, so a version change (0.16 on CPU machines, 0.19 on GPU clusters,
GPTModel's deprecation in favour of HybridModel) is handled in this one file.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from fapo_megatron.config import OptimConfig, ParallelConfig
from fapo_megatron.dist_env import PROCESS_GROUP_TIMEOUT_MINUTES
from fapo_megatron.megatron import platform
from fapo_megatron.models import hf_mapping, registry
from fapo_megatron.models.spec import ModelSpec


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP x PP x DP grid (megatron order tp-cp-ep-dp-pp)."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_model_parallel(tp: int, pp: int, seed: int) -> ParallelLayout:
    """Create megatron's process groups (once per process) and seed its RNG tracker."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=PROCESS_GROUP_TIMEOUT_MINUTES,
        )
    elif (current_layout().tp, current_layout().pp) != (tp, pp):
        raise RuntimeError("megatron process groups already exist with another tp/pp; one layout per process")
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    return ParallelLayout(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()


def build_gpt_model(spec: ModelSpec, config, layout: ParallelLayout, backend: str = "auto") -> GPTModel:
    """The GPTModel of this rank's pipeline stage on `platform.device()`."""
    with warnings.catch_warnings():
        # megatron-core >= 0.19 deprecates GPTModel in favour of HybridModel; GPTModel is what we test against.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = GPTModel(
            config=config,
            transformer_layer_spec=registry.layer_spec(spec, backend),
            pre_process=layout.is_first_stage,
            post_process=layout.is_last_stage,
            **registry.gpt_model_kwargs(spec, tp=layout.tp),
        )
    if not config.perform_initialization:
        _mark_tensor_parallel(model)
    return model.to(platform.device())


def _mark_tensor_parallel(model: GPTModel) -> None:
    """megatron-core sets the TP attributes of its weights only in their initialisers: built without one (weights
    from a checkpoint), every TP-split weight counted as a replica, so TP ranks > 0 left theirs out of the gradient
    norm (and the clipping) and resharding code could not tell split from replicated tensors."""
    for name, param in model.named_parameters():
        dim = hf_mapping.tp_split_dim(name)
        if dim is not None and not hasattr(param, "tensor_model_parallel"):
            tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)


def ddp_config(par: ParallelConfig) -> DistributedDataParallelConfig:
    """Megatron DDP settings from `parallel`: summed (not averaged) gradients, since the loss already carries the
    global normaliser; overlap, bucket size and gradient dtype as configured."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=par.grad_reduce_in_fp32,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        bucket_size=par.ddp_bucket_size or None,
        use_distributed_optimizer=par.use_distributed_optimizer,
        average_in_collective=False,
    )


def wrap_ddp(model: GPTModel, config, par: ParallelConfig) -> DistributedDataParallel:
    return DistributedDataParallel(config=config, ddp_config=ddp_config(par), module=model)


def optimizer_config(optim: OptimConfig, dtype: str, par: ParallelConfig) -> OptimizerConfig:
    """Megatron's AdamW settings, with the precision-aware optimizer and CPU offload as `optim` asks."""
    if optim.precision_aware and importlib.util.find_spec("transformer_engine") is None:
        # megatron-core reads Transformer Engine's version for this optimizer and fails obscurely without it
        raise RuntimeError("optim.precision_aware=true needs Transformer Engine, which is not installed here")
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        params_dtype=getattr(torch, dtype),
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather,
        use_precision_aware_optimizer=optim.precision_aware,
        exp_avg_dtype=getattr(torch, optim.exp_avg_dtype),
        exp_avg_sq_dtype=getattr(torch, optim.exp_avg_sq_dtype),
        optimizer_cpu_offload=optim.cpu_offload_fraction > 0,
        optimizer_offload_fraction=optim.cpu_offload_fraction,
    )


def build_optimizer(ddp_model: DistributedDataParallel, optim: OptimConfig, dtype: str, par: ParallelConfig):
    return get_megatron_optimizer(optimizer_config(optim, dtype, par), [ddp_model])


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over `optim.warmup_steps`, then `optim.lr_decay_style` down to min_lr at
    `total_steps` optimizer steps."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
