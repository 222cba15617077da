"""Prompt tokens of each step of a finished run, recovered by replaying its prompt sampler.

The trainer logs response tokens but not prompt tokens; the actor's FLOPs need both. The sampler's order
depends only on (data.seed, epoch) (data/sampler.py), so drawing the same number of batches from the same
data with the same tokenizer gives exactly the prompts each step trained on, resumed runs included.
"""

from __future__ import annotations

from fapo_megatron.config import Config


def replay_prompt_tokens(cfg: Config, num_steps: int) -> list[int]:
    """Prompt tokens of steps 1..num_steps: each kept prompt's length, counted once per rollout (x rollout.n).

    Prompts over rollout.max_prompt_tokens are left out, as the trainer leaves them out.
    """
    from fapo_megatron.data import PromptSampler
    from fapo_megatron.data.templates import encode_prompt, load_tokenizer
    from fapo_megatron.run_setup import load_train_val

    train, _ = load_train_val(cfg.data, genrm_max_steps=cfg.genrm.max_steps)
    sampler = PromptSampler(train, cfg.data.batch_size, cfg.data.seed)
    tokenizer = load_tokenizer(cfg)
    per_step = []
    for _ in range(num_steps):
        lengths = [len(encode_prompt(item, tokenizer)) for item in sampler.next_batch()]
        per_step.append(cfg.rollout.n * sum(n for n in lengths if n <= cfg.rollout.max_prompt_tokens))
    return per_step
