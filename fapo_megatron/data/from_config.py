"""The training and validation prompts a run's `data` config section asks for."""

from __future__ import annotations

from fapo_megatron.config import DataConfig
from fapo_megatron.data.arith import make_arith_items
from fapo_megatron.data.items import PromptItem
from fapo_megatron.data.loaders import load_prompts


def load_train_val(cfg: DataConfig, *, genrm_max_steps: int = 32) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, val) prompts: generated arithmetic chains, or the jsonl files (no val_path: no validation).

    `genrm_max_steps` (genrm.max_steps) is the step split of GenRM training prompts (data.format=genrm_steps).
    """
    if cfg.format == "arith":
        steps = {
            "min_steps": cfg.arith_min_steps,
            "max_steps": cfg.arith_max_steps,
            "max_value": cfg.arith_max_value,
            "max_operand": cfg.arith_max_operand,
            "identity_steps": cfg.arith_identity_steps,
        }
        train = make_arith_items(cfg.arith_num_train, cfg.seed, split="train", **steps)
        val = make_arith_items(cfg.arith_num_val, cfg.seed, split="val", **steps) if cfg.arith_num_val else []
        return train, val
    if cfg.format == "genrm_steps":
        from fapo_megatron.data.genrm_task import load_genrm_items

        train = load_genrm_items(cfg.train_path, genrm_max_steps)
        val = load_genrm_items(cfg.val_path, genrm_max_steps) if cfg.val_path else []
        return train, val
    train = load_prompts(cfg.train_path, cfg.format)
    val = load_prompts(cfg.val_path, cfg.format) if cfg.val_path else []
    return train, val
