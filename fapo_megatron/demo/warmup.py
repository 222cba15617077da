"""Warm-up of the CPU demo's tiny policy: a short supervised run on arithmetic-chain solutions.

RL needs a policy that sometimes gets the answer right, and FAPO needs one that sometimes gets it right for
the wrong reasons. So the warm-up data mixes clean solutions, flawed ones that still box the right answer and
wrong ones. Every chain ends in a trivial step (x 1 or + 0) and the flaws are the shortcuts there
(`data.arith.SHORTCUT_FLAWS`: the step skipped, stated as a bare number, or its result miswritten and ignored),
taken after all the real arithmetic, so they need no arithmetic a clean solution does not and only a flaw-aware
reward tells them apart from clean solutions.

A shortcut that works. Left at that, outcome-only RL still moves this tiny policy off the shortcuts (in a
measured run GRPO kept 0.34 of its flawed share over 50 steps): whatever it learns about writing steps out
carries over to the trivial one. For real models a shortcut often lands on the right answer *more* reliably,
because every step written out is a chance to slip, and that is why GRPO keeps them. The mixture says so too:
part of the wrong answers (`trivial_slip_share`, `data.arith.TRIVIAL_SLIP`) slip at the written-out trivial
step, a slip no shortcut can make, so the outcome reward favours the shortcut (with 0.15 of the solutions such
slips GRPO still kept only 0.48 of its flawed share; with 0.30 it moves most positives onto the shortcut), and
only FAPO, which gives a flawed positive 0 instead of +1, takes them away.

The mixture sets where RL starts: about 40 % of the positives flawed at the first step (the paper reports
20-40 % for real models), and more wrong answers than clean ones, so rho = clean / wrong starts below 1 (FAPO's
warm-up phase, where a flawed positive still earns a positive advantage) and crosses 1 as RL lifts the
accuracy. The result is a normal HF checkpoint (safetensors + tokenizer) that the Megatron actor and the
embedded engine load like any other model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fapo_megatron.data.arith import (
    FLAWS_WITH_CORRECT_ANSWER,
    SHORTCUT_FLAWS,
    TRIVIAL_SLIP,
    WRONG_ANSWER,
    arith_solution,
    make_arith_items,
)
from fapo_megatron.data.arith_tokenizer import arith_tokenizer
from fapo_megatron.data.templates import encode_prompt


@dataclass(kw_only=True)
class WarmupConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_size: int = 384
    num_items: int = 4000
    min_steps: int = 2
    max_steps: int = 3
    max_value: int = 20
    max_operand: int = 5
    identity_steps: int = 1
    """Trivial steps closing each chain (data.arith_identity_steps of the RL run); SHORTCUT_FLAWS need one."""
    clean_share: float = 0.24
    flaw_shares: tuple[tuple[str, float], ...] = (
        ("skipped_trivial", 0.10),
        ("bare_trivial", 0.11),
        ("fixed_trivial_slip", 0.03),
    )
    """Share of the solutions written with each flaw (data.arith names); the rest are wrong answers."""
    trivial_slip_share: float = 0.30
    """Share of the solutions whose wrong answer comes from a slip at the written-out trivial step (TRIVIAL_SLIP), a
    risk the shortcuts do not run; the other wrong answers slip at a real step."""

    def __post_init__(self):
        allowed = (*FLAWS_WITH_CORRECT_ANSWER, *SHORTCUT_FLAWS)
        for name, share in self.flaw_shares:
            if name not in allowed:
                raise ValueError(f"WarmupConfig.flaw_shares: {name!r} is not one of {allowed}")
            if name in SHORTCUT_FLAWS and not self.identity_steps:
                raise ValueError(f"WarmupConfig.flaw_shares: {name!r} needs identity_steps >= 1")
            if share < 0:
                raise ValueError(f"WarmupConfig.flaw_shares: {name!r} share {share} must be >= 0")
        if self.trivial_slip_share and not self.identity_steps:
            raise ValueError("WarmupConfig.trivial_slip_share: a slip at the trivial step needs identity_steps >= 1")
        total = self.clean_share + sum(share for _, share in self.flaw_shares) + self.trivial_slip_share
        if not 0 <= self.clean_share <= total <= 1 or self.trivial_slip_share < 0:
            raise ValueError(
                f"WarmupConfig: clean_share + flaw_shares + trivial_slip_share = {total:.3f} must lie in "
                "[clean_share, 1], each share >= 0"
            )

    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def build_tiny_llama(vocab_size: int, cfg: WarmupConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _examples(cfg: WarmupConfig, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + eos, prompt length) for the warm-up mixture."""
    rng = random.Random(cfg.seed)
    items = make_arith_items(
        cfg.num_items,
        seed=cfg.seed + 1,
        min_steps=cfg.min_steps,
        max_steps=cfg.max_steps,
        max_value=cfg.max_value,
        max_operand=cfg.max_operand,
        identity_steps=cfg.identity_steps,
    )
    examples = []
    for item in items:
        flaw = _solution_kind(cfg, rng.random())
        prompt_ids = encode_prompt(item, tokenizer)
        answer_ids = tokenizer(arith_solution(item, flaw=flaw, rng=rng), add_special_tokens=False)["input_ids"]
        examples.append(([*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids)))
    return examples


def _solution_kind(cfg: WarmupConfig, draw: float) -> str | None:
    """What a uniform draw in [0, 1) picks from the mixture: None (clean), a flaw of flaw_shares, TRIVIAL_SLIP or
    WRONG_ANSWER."""
    edge = cfg.clean_share
    if draw < edge:
        return None
    for name, share in (*cfg.flaw_shares, (TRIVIAL_SLIP, cfg.trivial_slip_share)):
        edge += share
        if draw < edge:
            return name
    return WRONG_ANSWER


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels) of (token ids, prompt length) pairs; only answer tokens are labelled."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, labels


def warm_up(out_dir: str | Path, cfg: WarmupConfig | None = None, *, progress: bool = True) -> Path:
    """Train the tiny policy and save it to `out_dir` (reused as is when it already holds this config's result)."""
    from tqdm import tqdm

    cfg = cfg or WarmupConfig()
    out_dir = Path(out_dir)
    stamp = out_dir / "warmup.json"
    config = json.loads(json.dumps(asdict(cfg)))  # as the stamp reads back (tuples become lists)
    if stamp.exists() and json.loads(stamp.read_text()).get("config") == config:
        return out_dir
    torch.manual_seed(cfg.seed)
    tokenizer = arith_tokenizer()
    model = build_tiny_llama(len(tokenizer), cfg, tokenizer)
    examples = _examples(cfg, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))
    )
    rng = random.Random(cfg.seed)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(cfg.steps), desc="warm-up (SFT)", disable=not progress, unit="step")
    model.train()
    for _ in bar:
        input_ids, labels = sft_batch(rng.sample(examples, cfg.batch_size), tokenizer.pad_token_id)
        loss = model(
            input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != tokenizer.pad_token_id), labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(json.dumps({"config": config, "final_loss": losses[-1], "seconds": time.perf_counter() - start}))
    return out_dir
