"""The FAPO training loop (Algorithm 1 of the paper, synchronous and colocated).

Per step: a batch of prompts -> n rollouts each -> answer check -> GenRM on the correct answers only -> FAPO
rewards (+ overlong shaping) -> group advantages -> the actor recomputes log-probs -> PPO/FAPO update over
mini-batches -> new weights pushed into the rollout engines. Every `val_interval` steps: avg@k validation
(no GenRM); every `checkpoint_interval` steps: a checkpoint (actor + data position + step).
`algorithm.name=grpo` runs the same loop with the flaw penalty off (the baseline).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from fapo_megatron.config import Config, dump_yaml, to_dict
from fapo_megatron.data import PromptSampler
from fapo_megatron.data.templates import encode_prompt
from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.experience import build_train_batch, grade_rollouts
from fapo_megatron.megatron import checkpoint_files
from fapo_megatron.metrics import MetricsLogger, PhaseTimer
from fapo_megatron.run_setup import RunData, build_judge_for_run, load_run_data, resume_path
from fapo_megatron.verify import AnswerChecker

VAL_SEED_STRIDE = 7919
"""Validation at step s samples with seed + 7919 * s, training with seed + s: a prime stride keeps every validation
seed apart from every training seed of the first 7919 steps, so validation never replays a rollout's draws."""


def sampling_params(cfg: Config) -> tuple[SamplingParams, SamplingParams]:
    """(rollout, validation) sampling of the run, resolved once from the config; the seed is set per step."""
    rollout = SamplingParams(
        max_new_tokens=cfg.rollout.max_response_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        n=cfg.rollout.n,
    )
    validation = SamplingParams(
        max_new_tokens=cfg.rollout.max_response_tokens,
        temperature=cfg.trainer.val_temperature,
        top_p=cfg.trainer.val_top_p,
        n=cfg.trainer.val_n,
    )
    return rollout, validation


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.resume_from = resume_path(cfg.trainer, self.output_dir)
        """The checkpoint to resume from (None: a fresh start), decided before any data, Ray or worker starts."""
        self.data: RunData = load_run_data(cfg)
        self.sampler = PromptSampler(self.data.train, cfg.data.batch_size, cfg.data.seed)
        self.checker = AnswerChecker(num_workers=cfg.trainer.answer_check_workers)
        self.rollout_params, self.val_params = sampling_params(cfg)
        self.timer = PhaseTimer()
        self.step = 0
        self.summary: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, float]]:
        from fapo_megatron.cluster.pools import ray_session
        from fapo_megatron.cluster.preemption import EXIT_PREEMPTED, install_preemption_handler
        from fapo_megatron.cluster.role_groups import PolicyGroup

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
        with ray_session(cfg) as session:
            from fapo_megatron.roles.genrm import GenRMWorker
            from fapo_megatron.roles.policy import PolicyWorker

            self.policy = PolicyGroup(session.worker_group("actor", PolicyWorker, init_args=(to_dict(cfg),)))
            self.judge = build_judge_for_run(cfg, session, GenRMWorker)
            self._resume()
            with self.timer.phase("weight_sync"):
                self.policy.sync_weights()  # engines start from the actor's (possibly resumed) weights
            preemption = install_preemption_handler()
            self.logger = MetricsLogger(self.output_dir, resume_step=self.step)
            bar = _progress(cfg, self.step)
            try:
                while self.step < cfg.trainer.steps:
                    metrics = self.train_step(bar)
                    self.step += 1
                    if self._validation_due():
                        with self.timer.phase("validation"):
                            metrics.update(self.validate())
                    # The row goes out before the checkpoint: a kill between the two resumes at the step
                    # before, which rewinds the row; the other order would lose it. The save's time is
                    # reported in the next step's row.
                    metrics.update({f"time/{k}": v for k, v in self.timer.reset().items()})
                    self.logger.log(self.step, metrics)
                    self.summary.append(metrics)
                    if self._due(cfg.trainer.checkpoint_interval) or preemption.requested:
                        with self.timer.phase("checkpoint"):
                            self.save_checkpoint()
                    bar.update(1)
                    if preemption.requested:
                        raise SystemExit(EXIT_PREEMPTED)
                if self._newest_saved_step() != self.step:
                    self.save_checkpoint()
            finally:
                bar.close()
                self.logger.close()
                self.checker.close()
        return self.summary

    def train_step(self, bar) -> dict[str, float]:
        cfg, timer = self.cfg, self.timer
        start = time.perf_counter()
        items = self.sampler.next_batch()
        prompts = [encode_prompt(item, self.data.tokenizer) for item in items]
        fits = [i for i, p in enumerate(prompts) if len(p) <= cfg.rollout.max_prompt_tokens]
        num_too_long = len(prompts) - len(fits)
        items, prompts = [items[i] for i in fits], [prompts[i] for i in fits]

        bar.set_postfix_str(f"step {self.step + 1}: rollout")
        with timer.phase("rollout"):
            generations = self.policy.generate(prompts, self.sampling(validation=False))
            self.policy.wake_actor()
        correct = self.checker.check(
            [g.text for g in generations], [items[g.prompt_index].ground_truth for g in generations]
        )
        bar.set_postfix_str(f"step {self.step + 1}: genrm")
        with timer.phase("genrm_visible"):  # synchronous: the step waits for the judge the whole time it is busy
            graded = grade_rollouts(
                items,
                generations,
                torch.tensor(correct, dtype=torch.bool),
                self.judge,
                algorithm=cfg.algorithm,
                rollout=cfg.rollout,
                genrm=cfg.genrm,
            )
        timer.add("genrm", timer.seconds["genrm_visible"])
        batch = build_train_batch(generations, graded.advantages, graded.keep, self.data.tokenizer.pad_token_id)

        bar.set_postfix_str(f"step {self.step + 1}: log-probs")
        with timer.phase("logprobs"):
            old_logprobs, entropy = self.policy.compute_logprobs(batch)
        batch = dataclasses.replace(batch, old_logprobs=old_logprobs)
        bar.set_postfix_str(f"step {self.step + 1}: update")
        with timer.phase("update"):
            update = self.policy.train_step(batch)
        bar.set_postfix_str(f"step {self.step + 1}: weight sync")
        with timer.phase("weight_sync"):
            sync = self.policy.sync_weights()

        mask = batch.response_mask.bool()
        response_tokens = int(mask.sum())
        metrics = dict(graded.metrics)
        metrics.update({f"actor/{k}": v for k, v in update.items()})
        metrics["actor/entropy"] = float(entropy[mask].mean()) if response_tokens else 0.0
        metrics["actor/rollout_logprob_abs_diff"] = (
            float((old_logprobs - batch.rollout_logprobs)[mask].abs().mean()) if response_tokens else 0.0
        )
        metrics["data/prompts_too_long"] = float(num_too_long)
        metrics["data/epoch"] = float(self.sampler.state_dict().get("epoch", 0))
        metrics["weight_sync/bytes"] = max(s["bytes"] for s in sync)
        elapsed = time.perf_counter() - start
        metrics["perf/step_seconds"] = elapsed
        metrics["perf/tokens_per_second"] = response_tokens / elapsed if elapsed > 0 else 0.0
        metrics["perf/response_tokens"] = float(response_tokens)
        metrics["perf/prompt_tokens"] = float(batch.lengths.sum()) - response_tokens  # of the rollouts trained on
        bar.set_postfix_str(
            f"step {self.step + 1}: acc {metrics['reward/accuracy']:.2f} "
            f"flawed {format_share(metrics['reward/flawed_positive_share'], 2)}"
        )
        return metrics

    # ------------------------------------------------------------------------------------------ parts

    def sampling(self, *, validation: bool) -> SamplingParams:
        """This step's sampling: the run's rollout or validation parameters with this step's seed."""
        if validation:
            return dataclasses.replace(self.val_params, seed=self.cfg.trainer.seed + VAL_SEED_STRIDE * self.step)
        return dataclasses.replace(self.rollout_params, seed=self.cfg.trainer.seed + self.step)

    def validate(self) -> dict[str, float]:
        """avg@k accuracy on the validation prompts (no GenRM in the reward; the program checker, when the task
        has one, still reports the flawed-positive share)."""
        if not self.data.val:
            return {}
        prompts = [encode_prompt(item, self.data.tokenizer) for item in self.data.val]
        generations = self.policy.generate(prompts, self.sampling(validation=True))
        golds = [self.data.val[g.prompt_index].ground_truth for g in generations]
        correct = torch.tensor(self.checker.check([g.text for g in generations], golds), dtype=torch.bool)
        metrics = {"val/accuracy": float(correct.float().mean())}
        if self.data.monitor_judge is not None:
            from fapo_megatron.experience import judge_correct_rollouts

            flawed, available, _ = judge_correct_rollouts(self.data.monitor_judge, self.data.val, generations, correct)
            judged = correct & available
            metrics["val/flawed_positive_share"] = (
                float((flawed & judged).sum() / judged.sum()) if bool(judged.any()) else math.nan
            )
            metrics["val/clean_accuracy"] = float((correct & ~flawed).float().mean())
        return metrics

    # ------------------------------------------------------------------------------------------ state

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _validation_due(self) -> bool:
        interval = self.cfg.trainer.val_interval
        return interval > 0 and (self._due(interval) or self.step == self.cfg.trainer.steps)

    def save_checkpoint(self) -> None:
        extra = {"step": self.step, "sampler": self.sampler.state_dict()}
        self.policy.save(str(self.checkpoint_dir), extra)
        checkpoint_files.prune(self.checkpoint_dir, self.cfg.trainer.keep_checkpoints)

    def _newest_saved_step(self) -> int | None:
        steps = checkpoint_files.complete_steps(self.checkpoint_dir)
        return steps[-1][0] if steps else None

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        extra = self.policy.load(str(path))
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        print(f"fapo-megatron: resumed from {path} at step {self.step}", flush=True)


def _progress(cfg: Config, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=cfg.trainer.steps,
        initial=initial,
        desc="FAPO" if cfg.algorithm.name == "fapo" else "GRPO",
        unit="step",
        disable=not cfg.trainer.progress,
        dynamic_ncols=True,
    )


def format_share(value: float | None, digits: int = 3) -> str:
    """A metric for people: "n/a" where it is undefined (NaN, e.g. a share of zero judged rollouts), never 0."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def print_summary(summary: list[dict[str, float]], output_dir: str | Path) -> None:
    """A short table: first and last step of the headline metrics, and where step time went."""
    if not summary:
        return
    first, last = summary[0], summary[-1]
    rows = [
        ("reward/accuracy", "accuracy"),
        ("reward/flawed_positive_share", "flawed-positive share"),
        ("reward/mean", "reward"),
        ("response/length_mean", "response length"),
        ("val/accuracy", "val accuracy"),
    ]
    print(f"\n{'metric':<24}{'first step':>12}{'last step':>12}")
    for key, label in rows:
        if key in last:
            print(f"{label:<24}{format_share(first.get(key, math.nan)):>12}{format_share(last[key]):>12}")
    totals = {}
    for record in summary:
        for key, value in record.items():
            if key.startswith("time/"):
                totals[key[5:]] = totals.get(key[5:], 0.0) + value
    whole = sum(totals.values()) or 1.0
    print("time: " + ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))
    print(f"TensorBoard: tensorboard --logdir {Path(output_dir) / 'tensorboard'}")
