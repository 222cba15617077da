"""Train a tiny GenRM with the FAPO-GenRM RL recipe on CPU and watch its reward move (a few minutes).

1. Data: ProcessBench-format items (problem, steps, label, final_answer_correct, ground_truth) made from the
   arithmetic-chain task, whose step checker gives exact earliest-error labels; clean, flawed-positive and
   wrong-answer solutions, written as jsonl.
2. Starting model: a tiny character-level Llama taught the answer format only: it is fine-tuned to answer each
   GenRM prompt with `\\boxed{k}` for a random k in -1..n-1, so it knows how to answer but not which index is right.
3. RL: `fapo-megatron train examples/genrm_train_tiny.yaml` with these paths: GRPO, prompts from
   `build_genrm_messages`, reward = the step-distance reward of the parsed index (algorithm.reward=genrm_step).
4. The step-distance reward and the exact-index rate per step.

    python examples/genrm_train_tiny.py [--out runs/genrm_train_tiny] [--steps 16] [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import torch

from fapo_megatron.data.arith import (
    FLAWS_WITH_CORRECT_ANSWER,
    WRONG_ANSWER,
    arith_solution,
    first_wrong_step,
    make_arith_items,
)
from fapo_megatron.data.arith_tokenizer import arith_tokenizer
from fapo_megatron.data.templates import encode_prompt
from fapo_megatron.demo.warmup import sft_batch
from fapo_megatron.genrm.prompt import split_steps
from fapo_megatron.genrm.task import load_genrm_items
from fapo_megatron.metrics import read_metrics

CONFIG = Path(__file__).with_suffix(".yaml")
SOLUTION_KINDS = (None, None, *FLAWS_WITH_CORRECT_ANSWER, WRONG_ANSWER)
"""Drawn uniformly: a third of the items clean, half flawed positives, a sixth wrong answers."""


def write_step_labelled(path: Path, num_items: int, seed: int) -> Path:
    """ProcessBench-format jsonl of arithmetic-chain solutions with their exact earliest-error labels."""
    rng = random.Random(seed)
    problems = make_arith_items(num_items, seed, min_steps=2, max_steps=3, max_value=40, max_operand=9)
    with path.open("w") as handle:
        for problem in problems:
            kind = rng.choice(SOLUTION_KINDS)
            steps = split_steps(arith_solution(problem, flaw=kind, rng=rng))
            entry = {
                "id": f"arith-{problem.index}",
                "problem": problem.prompt,
                "steps": steps,
                "label": first_wrong_step(problem.prompt, steps),
                "final_answer_correct": kind != WRONG_ANSWER,
                "ground_truth": problem.ground_truth,
            }
            handle.write(json.dumps(entry) + "\n")
    return path


def format_warm_up(out_dir: Path, data_path: Path, *, steps: int = 120, seed: int = 0) -> Path:
    """A tiny Llama fine-tuned to answer every GenRM prompt with a random valid index: format, not skill."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = arith_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    items = load_genrm_items(str(data_path), max_steps=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = []
        for item in rng.sample(items, 16):
            prompt = encode_prompt(item, tokenizer)
            guess = rng.randrange(-1, item.meta["num_steps"])
            answer = tokenizer(f"\\boxed{{{guess}}}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            batch.append((prompt + answer, len(prompt)))
        input_ids, labels = sft_batch(batch, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"format warm-up: {steps} steps, final loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/genrm_train_tiny", help="folder for data, model and the run")
    parser.add_argument("--steps", type=int, default=16, help="RL steps")
    parser.add_argument("--items", type=int, default=400, help="training items to generate")
    parser.add_argument("--warmup-steps", type=int, default=120, help="format warm-up (SFT) steps")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the RL run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_step_labelled(out / "train.jsonl", args.items, seed=1)
    model = out / "model"
    if not (model / "config.json").is_file():
        format_warm_up(model, data, steps=args.warmup_steps)
    overrides = [
        f"model.path={model}",
        f"data.train_path={data}",
        f"trainer.output_dir={out / 'train'}",
        f"trainer.steps={args.steps}",
        "trainer.resume=none",
        *args.overrides,
    ]
    command = [sys.executable, "-m", "fapo_megatron", "train", str(CONFIG), *overrides]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        return 1
    records = read_metrics(out / "train" / "metrics.jsonl")
    print(f"\n{'step':>4} {'reward':>8} {'exact index':>12} {'unparseable':>12}")
    for r in records:
        print(
            f"{r['step']:>4} {r['reward/mean']:>8.3f} {r['reward/accuracy']:>12.3f} "
            f"{r['genrm_task/unparseable_share']:>12.3f}"
        )
    half = max(1, len(records) // 2)
    first = sum(r["reward/mean"] for r in records[:half]) / half
    last = sum(r["reward/mean"] for r in records[-half:]) / half
    print(f"\nmean reward, first {half} steps {first:.3f} -> last {half} steps {last:.3f}")
    return 0 if math.isfinite(first) and math.isfinite(last) else 1


if __name__ == "__main__":
    sys.exit(main())
