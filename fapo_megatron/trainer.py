"""The FAPO training loop (Algorithm 1 of the paper; synchronous, or one step off-policy with a separate rollout pool).

Per step: a batch of prompts -> n rollouts each -> answer check -> GenRM on the correct answers only -> FAPO
rewards (+ overlong shaping) -> group advantages -> the actor recomputes log-probs -> PPO/FAPO update over
mini-batches -> new weights pushed into the rollout engines. Every `val_interval` steps: avg@k validation
(no GenRM); every `checkpoint_interval` steps: a checkpoint (actor + data position + step).
`algorithm.name=grpo` runs the same loop with the flaw penalty off (the baseline). With `trainer.off_policy_steps=1`
step k+1's rollouts are sampled (by the weights of step k-1's update) while step k trains.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fapo_megatron.config import Config, dump_yaml, to_dict
from fapo_megatron.data import PromptSampler
from fapo_megatron.data.templates import encode_prompt
from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.experience import build_train_batch, grade_rollouts, judge_request
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


@dataclass
class DrawnBatch:
    """A step's prompts as drawn, with the sampler position after them (what a checkpoint of that step saves)."""

    items: list
    prompts: list[list[int]]
    num_too_long: int
    position: dict
    pending: object = None
    """Off-policy: the rollouts being generated for it (role_groups.PendingGenerations)."""


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.trainer.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        written = self.output_dir / "config.yaml"
        same_run = written.is_file() and written.read_text() == dump_yaml(cfg)
        self.resume_from = resume_path(cfg.trainer, self.output_dir, same_run=same_run)
        """The checkpoint to resume from (None: a fresh start), decided before any data, Ray or worker starts."""
        self.data: RunData = load_run_data(cfg)
        self.sampler = PromptSampler(self.data.train, cfg.data.batch_size, cfg.data.seed)
        self.checker = AnswerChecker(num_workers=cfg.trainer.answer_check_workers)
        self.rollout_params, self.val_params = sampling_params(cfg)
        self.timer = PhaseTimer()
        self.step = 0
        self.summary: list[dict[str, float]] = []
        self.sampler_position = self.sampler.state_dict()
        """Where the sampler stands after the batch trained last (a prefetched batch is drawn again on resume)."""
        self.weight_version = 0
        """Weight pushes so far: the version the actor's weights are at between updates."""
        self._prefetched: DrawnBatch | None = None

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, float]]:
        from fapo_megatron.cluster.pools import ray_session
        from fapo_megatron.cluster.preemption import EXIT_PREEMPTED, install_preemption_handler
        from fapo_megatron.cluster.role_groups import PolicyGroup, RolloutGroup

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
        with ray_session(cfg) as session:
            from fapo_megatron.roles.genrm import GenRMWorker
            from fapo_megatron.roles.policy import PolicyWorker
            from fapo_megatron.roles.rollout import RolloutWorker

            self.policy = PolicyGroup(
                session.worker_group("actor", PolicyWorker, init_args=(to_dict(cfg),), engine_role="rollout")
            )
            # The one place that decides who generates: the actor ranks' engines, or a rollout pool of its own.
            self.rollout = self.policy
            if cfg.rollout.placement == "separate":
                self.rollout = RolloutGroup(
                    session.worker_group("rollout", RolloutWorker, init_args=(to_dict(cfg),), engine_role="rollout")
                )
                self.rollout.connect(self.policy)
            self.policy.enter_genrm()  # GenRM engines start on devices the rollout engines and actors left
            self.judge = build_judge_for_run(cfg, session, GenRMWorker)
            self._resume()
            with self.timer.phase("weight_sync"):
                self._sync_weights()  # engines start from the actor's (possibly resumed) weights
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
                    else:
                        self._finish_checkpoint(blocking=False)
                    bar.update(1)
                    if preemption.requested:
                        raise SystemExit(EXIT_PREEMPTED)
                self._finish_checkpoint(blocking=True)
                if self._newest_saved_step() != self.step:
                    self.save_checkpoint()
            finally:
                try:
                    self._finish_checkpoint(blocking=True)  # an error or pre-emption exit waits for the writers too
                finally:
                    bar.close()
                    self.logger.close()
                    self.checker.close()
        return self.summary

    def train_step(self, bar) -> dict[str, float]:
        cfg, timer = self.cfg, self.timer
        start = time.perf_counter()
        bar.set_postfix_str(f"step {self.step + 1}: rollout")
        stream = self._verdict_stream()
        early = 0
        with timer.phase("rollout"):
            drawn, chunks = self._rollouts(streamed=stream is not None)
            items, num_too_long = drawn.items, drawn.num_too_long
            self.sampler_position = drawn.position
            if stream is None:
                generations = [gen for chunk in chunks for _, gen in chunk]
            else:
                generations, correct, early = self._generate_and_submit(items, chunks, stream)
            self.policy.enter_genrm()
        pad_id = self.data.tokenizer.pad_token_id
        if stream is None:
            correct = self.checker.check(
                [g.text for g in generations], [items[g.prompt_index].ground_truth for g in generations]
            )
            bar.set_postfix_str(f"step {self.step + 1}: genrm")
            with timer.phase("genrm_visible"):  # synchronous: the step waits for the judge the whole time it is busy
                graded = self._grade(items, generations, correct)
            timer.add("genrm", timer.seconds["genrm_visible"])
            batch = build_train_batch(generations, graded.advantages, graded.keep, pad_id)
            bar.set_postfix_str(f"step {self.step + 1}: log-probs")
            with timer.phase("logprobs"):
                old_logprobs, entropy = self.policy.compute_logprobs(batch)
        else:
            # The old log-probs do not depend on rewards: computed for every rollout while verdicts are out, then
            # the kept rows are taken (right padding: the kept batch is a column prefix of the full one).
            everything = torch.ones(len(generations), dtype=torch.bool)
            full = build_train_batch(generations, torch.zeros(len(generations)), everything, pad_id)
            bar.set_postfix_str(f"step {self.step + 1}: log-probs")
            with timer.phase("logprobs"):
                full_logprobs, full_entropy = self.policy.compute_logprobs(full)
            bar.set_postfix_str(f"step {self.step + 1}: genrm")
            with timer.phase("genrm_visible"):
                verdicts = stream.collect()
            timer.add("genrm", stream.busy_seconds)
            graded = self._grade(items, generations, correct, verdicts)
            batch = build_train_batch(generations, graded.advantages, graded.keep, pad_id)
            rows, width = graded.keep.nonzero().squeeze(1), batch.tokens.shape[1]
            old_logprobs, entropy = full_logprobs[rows, :width], full_entropy[rows, :width]
        batch = dataclasses.replace(batch, old_logprobs=old_logprobs)
        bar.set_postfix_str(f"step {self.step + 1}: update")
        with timer.phase("update"):
            update = self.policy.train_step(batch)
        staleness = self.weight_version - sum(g.weight_version for g in generations) / max(len(generations), 1)
        if self._prefetched is not None:
            with timer.phase("rollout"):  # the next step's rollouts must be done before the engines take the push
                self._prefetched.pending.wait()
        bar.set_postfix_str(f"step {self.step + 1}: weight sync")
        with timer.phase("weight_sync"):
            sync = self._sync_weights()

        mask = batch.response_mask.bool()
        response_tokens = int(mask.sum())
        metrics = dict(graded.metrics)
        if self.judge is not None and cfg.algorithm.reward != "genrm_step":
            metrics["genrm/sent_during_rollout"] = float(early)
        metrics.update({f"actor/{k}": v for k, v in update.items()})
        metrics["actor/entropy"] = float(entropy[mask].mean()) if response_tokens else 0.0
        metrics["actor/rollout_logprob_abs_diff"] = (
            float((old_logprobs - batch.rollout_logprobs)[mask].abs().mean()) if response_tokens else 0.0
        )
        metrics["data/prompts_too_long"] = float(num_too_long)
        metrics["data/epoch"] = float(self.sampler_position.get("epoch", 0))
        metrics["perf/staleness"] = staleness
        metrics["weight_sync/bytes"] = max(s["bytes"] for s in sync)
        metrics.update(self.policy.memory_ledger())
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

    def sampling(self, *, validation: bool, step: int | None = None) -> SamplingParams:
        """A step's sampling (default this one): the run's rollout or validation parameters with the step's seed."""
        step = self.step if step is None else step
        if validation:
            return dataclasses.replace(self.val_params, seed=self.cfg.trainer.seed + VAL_SEED_STRIDE * step)
        return dataclasses.replace(self.rollout_params, seed=self.cfg.trainer.seed + step)

    def _draw(self) -> DrawnBatch:
        """The next batch of prompts that fit rollout.max_prompt_tokens (the others counted), tokenized."""
        items = self.sampler.next_batch()
        prompts = [encode_prompt(item, self.data.tokenizer) for item in items]
        fits = [i for i, p in enumerate(prompts) if len(p) <= self.cfg.rollout.max_prompt_tokens]
        return DrawnBatch(
            items=[items[i] for i in fits],
            prompts=[prompts[i] for i in fits],
            num_too_long=len(prompts) - len(fits),
            position=self.sampler.state_dict(),
        )

    def _rollouts(self, *, streamed: bool):
        """This step's batch and its samples as chunks of (prompt-major position, generation).

        On-policy the batch is drawn and sampled now (streamed: chunks as the engines finish them). With
        trainer.off_policy_steps=1 it was drawn and sent to the rollout pool during the step before (the first
        step, or the first after a resume, draws its own), and the next step's batch leaves before this one trains.
        """
        if not self.cfg.trainer.off_policy_steps:
            drawn, params = self._draw(), self.sampling(validation=False)
            if streamed:
                return drawn, self.rollout.generate_stream(drawn.prompts, params)
            return drawn, [list(enumerate(self.rollout.generate(drawn.prompts, params)))]
        drawn = self._prefetched or self._prefetch(self.step)
        self._prefetched = self._prefetch(self.step + 1) if self.step + 1 < self.cfg.trainer.steps else None
        return drawn, [list(enumerate(drawn.pending.result()))]

    def _prefetch(self, step: int) -> DrawnBatch:
        drawn = self._draw()
        drawn.pending = self.rollout.generate_async(drawn.prompts, self.sampling(validation=False, step=step))
        return drawn

    def _sync_weights(self) -> list[dict[str, float]]:
        sync = self.policy.sync_weights()
        self.weight_version += 1
        return sync

    def _verdict_stream(self):
        """A stream for this step's verdicts when they can leave during the rollout (genrm.stream with an external
        GenRM or GenRM workers on their own pool); None: judge after the rollout."""
        open_stream = getattr(self.judge, "open_stream", None)
        if not self.cfg.genrm.stream or open_stream is None or self.cfg.algorithm.reward == "genrm_step":
            return None
        return open_stream()

    def _generate_and_submit(self, items, chunks, stream):
        """Rollouts as the engines finish them (`chunks`, e.g. `generate_stream` through Ray streaming generators):
        each one's answer is checked on arrival and, when correct, its judge request leaves at once.

        Returns (generations in prompt-major order, correct [N] bool, requests sent before the last rollout came).
        """
        finished, correct_of, sent, early = {}, {}, [], 0
        for chunk in chunks:
            early = len(sent)  # everything sent before this chunk left while generation still ran
            golds = [items[g.prompt_index].ground_truth for _, g in chunk]
            for (position, gen), ok in zip(chunk, self.checker.check([g.text for _, g in chunk], golds)):
                if position in finished:
                    raise RuntimeError(f"rollout {position} reported twice by the engines")
                finished[position], correct_of[position] = gen, ok
                if ok:
                    stream.submit(position, judge_request(items[gen.prompt_index], gen))
                    sent.append(position)
        if sorted(finished) != list(range(len(finished))):
            raise RuntimeError(f"engines reported rollouts {sorted(finished)}, not 0..{len(finished) - 1}")
        generations = [finished[p] for p in range(len(finished))]
        return generations, [correct_of[p] for p in range(len(finished))], early

    def _grade(self, items, generations, correct, verdicts=None):
        return grade_rollouts(
            items,
            generations,
            torch.tensor(correct, dtype=torch.bool),
            self.judge,
            algorithm=self.cfg.algorithm,
            rollout=self.cfg.rollout,
            genrm=self.cfg.genrm,
            verdicts=verdicts,
        )

    def validate(self) -> dict[str, float]:
        """avg@k accuracy on the validation prompts (no GenRM in the reward; the program checker, when the task
        has one, still reports the flawed-positive share)."""
        if not self.data.val:
            return {}
        prompts = [encode_prompt(item, self.data.tokenizer) for item in self.data.val]
        generations = self.rollout.generate(prompts, self.sampling(validation=True))
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

    def state_dict(self) -> dict:
        """The loop's own state, saved beside the actor's: the step (which names checkpoints) and the data position."""
        return {"step": self.step, "sampler": self.sampler_position}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.sampler_position = self.sampler.state_dict()

    def save_checkpoint(self) -> None:
        """Save (with trainer.async_checkpoint: start the background write; the folder is published later), then
        prune the complete folders beyond keep_checkpoints."""
        self.policy.save(str(self.checkpoint_dir), self.step, self.state_dict())
        checkpoint_files.prune(self.checkpoint_dir, self.cfg.trainer.keep_checkpoints)

    def _finish_checkpoint(self, *, blocking: bool) -> None:
        """Publish a background save whose writers are done (blocking: wait for them), then prune."""
        if self.cfg.trainer.async_checkpoint and self.policy.finish_checkpoint(blocking) is not None:
            checkpoint_files.prune(self.checkpoint_dir, self.cfg.trainer.keep_checkpoints)

    def _newest_saved_step(self) -> int | None:
        steps = checkpoint_files.complete_steps(self.checkpoint_dir)
        return steps[-1][0] if steps else None

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        self.load_state_dict(self.policy.load(str(path)))
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
        ("genrm/flawed_share", "GenRM flawed share"),
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
            if key.startswith("time/") and key != "time/genrm":  # busy time overlaps the others when streamed
                totals[key[5:]] = totals.get(key[5:], 0.0) + value
    whole = sum(totals.values()) or 1.0
    print("time: " + ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))
    print(f"TensorBoard: tensorboard --logdir {Path(output_dir) / 'tensorboard'}")
