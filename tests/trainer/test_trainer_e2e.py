"""End to end on CPU: 2 gloo actor ranks (TP=2), local Ray, embedded engines, the program step checker as GenRM."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fapo_megatron.config import load_config
from fapo_megatron.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory):
    """A tiny arithmetic policy after a short warm-up: it answers some problems right, some with flaws (more clean
    answers and no trivial-step slips than the demo's mixture, so that a short warm-up answers right at all)."""
    from fapo_megatron.demo.warmup import WarmupConfig, warm_up

    return warm_up(
        tmp_path_factory.mktemp("policy"),
        WarmupConfig(steps=250, num_items=1500, clean_share=0.5, trivial_slip_share=0.0),
        progress=False,
    )


def _train(out: Path, policy: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run `fapo-megatron train` in its own process, as a user would."""
    overrides = [
        f"model.path={policy}",
        f"trainer.output_dir={out}",
        "trainer.progress=false",
        "data.batch_size=4",
        "algorithm.mini_batch_size=2",
        "parallel.micro_batch_size=4",
        "trainer.val_interval=0",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "fapo_megatron", "train", str(CONFIG), *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def fapo_run(warm_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("fapo")
    _ok(_train(out, warm_policy, "trainer.steps=3", "trainer.checkpoint_interval=2"))
    return out


def test_metrics_present_and_sane(fapo_run):
    records = read_metrics(fapo_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    rollouts = 4 * 8  # data.batch_size x rollout.n
    for r in records:
        for key in (
            "reward/accuracy",
            "reward/mean",
            "actor/grad_norm",
            "actor/pg_clipfrac",
            "actor/entropy",
            "actor/lr",
            "response/length_mean",
            "time/rollout",
            "time/genrm",
            "time/logprobs",
            "time/update",
            "time/weight_sync",
            "perf/tokens_per_second",
            "genrm/asked",
        ):
            assert key in r and r[key] is not None and math.isfinite(r[key]), key
        assert 0.0 <= r["reward/accuracy"] <= 1.0 and -2.0 <= r["reward/mean"] <= 1.0
        # A share of nothing is undefined (null), never 0.
        assert (r["reward/flawed_positive_share"] is None) == (r["genrm/asked"] == 0)
        # The GenRM is asked about the rollouts with a correct answer, and only those.
        assert r["genrm/asked"] == pytest.approx(r["reward/accuracy"] * rollouts)
        assert r["genrm/flawed"] + r["genrm/clean"] == r["genrm/asked"]
        # A gradient flows exactly when some rollout has a non-zero advantage (a group of equal rewards has none).
        assert (r["actor/grad_norm"] > 0) == (r["reward/advantage_abs_mean"] > 0)
        # After each weight push the engine samples with the actor's weights: its log-probs match the actor's.
        assert r["actor/rollout_logprob_abs_diff"] < 1e-4
    assert sum(r["genrm/asked"] for r in records) > 0, "the warmed-up policy never answered right"
    assert any(r["actor/grad_norm"] > 0 for r in records), "no step updated the policy"
    assert (fapo_run / "tensorboard").is_dir() and any((fapo_run / "tensorboard").iterdir())


def test_parameters_changed(fapo_run, warm_policy, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fapo_megatron",
            "convert",
            "megatron-to-hf",
            "--ckpt",
            str(fapo_run / "checkpoints"),
            "--out",
            str(out),
            "--hf-config-from",
            str(warm_policy),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    before = load_file(warm_policy / "model.safetensors")
    after = {}
    for shard in out.glob("*.safetensors"):
        after.update(load_file(shard))
    assert set(before) == set(after)
    changed = [name for name in before if not (before[name].float() - after[name].float()).abs().max() == 0]
    assert len(changed) == len(before), f"unchanged after 3 steps: {sorted(set(before) - set(changed))}"


def test_resume_matches_uninterrupted_run(fapo_run, warm_policy, tmp_path):
    """Stop after the step-2 checkpoint, resume: step 3 equals step 3 of the run that never stopped."""
    out = tmp_path / "resumed"
    _ok(_train(out, warm_policy, "trainer.steps=2", "trainer.checkpoint_interval=2"))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    _ok(_train(out, warm_policy, "trainer.steps=3", "trainer.checkpoint_interval=2", "trainer.resume=auto"))
    resumed = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    straight = {r["step"]: r for r in read_metrics(fapo_run / "metrics.jsonl")}
    assert sorted(resumed) == [1, 2, 3]
    for key in ("actor/pg_loss", "reward/mean", "reward/accuracy", "actor/grad_norm"):
        assert resumed[3][key] == pytest.approx(straight[3][key], rel=1e-5, abs=1e-7), key


def test_async_checkpoint_run_exits_after_the_write_and_resumes_the_same(fapo_run, warm_policy, tmp_path):
    """trainer.async_checkpoint: the run ends with its last background save complete (named by `latest`, no .tmp
    left), and a resume from it takes the same step 3 as the run that never stopped."""
    out = tmp_path / "async"
    async_on = "trainer.async_checkpoint=true"
    _ok(_train(out, warm_policy, "trainer.steps=2", "trainer.checkpoint_interval=1", async_on))
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    _ok(_train(out, warm_policy, "trainer.steps=3", "trainer.checkpoint_interval=2", "trainer.resume=auto", async_on))
    resumed = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    straight = {r["step"]: r for r in read_metrics(fapo_run / "metrics.jsonl")}
    for key in ("actor/pg_loss", "reward/mean", "reward/accuracy", "actor/grad_norm"):
        assert resumed[3][key] == pytest.approx(straight[3][key], rel=1e-5, abs=1e-7), key
    assert (root / "latest").read_text().strip() == "step_00000003"


def test_genrm_outage_is_reported_and_policy_applied(warm_policy, tmp_path):
    """An external GenRM that refuses every call: the run goes on and counts each missing verdict."""
    out = tmp_path / "outage"
    _ok(
        _train(
            out,
            warm_policy,
            "trainer.steps=2",
            "genrm.backend=external",
            "genrm.url=http://127.0.0.1:9",
            "genrm.retries=0",
            "genrm.deadline_s=20",
            "genrm.unavailable_policy=treat_as_flawed",
            "genrm.max_unavailable_fraction=1.0",
        )
    )
    records = read_metrics(out / "metrics.jsonl")
    for r in records:
        assert r["genrm/unavailable"] + r["genrm/errors"] + r["genrm/timed_out"] == r["genrm/asked"]
        assert r["genrm/flawed"] == 0 and r["genrm/clean"] == 0
        assert r["reward/num_unavailable"] == r["genrm/asked"]
    assert sum(r["genrm/asked"] for r in records) > 0


def test_genrm_fully_down_stops_the_run_under_the_default_drop_policy(warm_policy, tmp_path):
    """Dropping every correct rollout would train on wrong answers only: the step fails, naming the limit."""
    proc = _train(
        tmp_path / "down",
        warm_policy,
        "trainer.steps=2",
        "genrm.backend=external",
        "genrm.url=http://127.0.0.1:9",
        "genrm.retries=0",
    )
    assert proc.returncode != 0
    assert "above genrm.max_unavailable_fraction=0.5" in proc.stderr


def test_genrm_outage_with_fail_policy_stops_the_run(warm_policy, tmp_path):
    proc = _train(
        tmp_path / "fail",
        warm_policy,
        "trainer.steps=2",
        "genrm.backend=external",
        "genrm.url=http://127.0.0.1:9",
        "genrm.retries=0",
        "genrm.unavailable_policy=fail",
    )
    assert proc.returncode != 0
    assert "unavailable" in (proc.stderr + proc.stdout).lower()


def test_flaw_penalty_only_in_fapo(fapo_run, warm_policy, tmp_path):
    """FAPO: reward = outcome + overlong - lambda x flawed; GRPO (same loop): flawed positives keep their +1."""
    rollouts = 4 * 8
    for r in read_metrics(fapo_run / "metrics.jsonl"):
        expected = r["reward/outcome_mean"] + r["reward/overlong_mean"] - r["genrm/flawed"] / rollouts
        assert r["reward/mean"] == pytest.approx(expected, abs=1e-5)
    out = tmp_path / "grpo"
    _ok(_train(out, warm_policy, "trainer.steps=2", "algorithm.name=grpo"))
    records = read_metrics(out / "metrics.jsonl")
    assert sum(r["genrm/flawed"] for r in records) > 0, "no flawed positive to tell GRPO from FAPO"
    for r in records:
        assert r["reward/mean"] == pytest.approx(r["reward/outcome_mean"] + r["reward/overlong_mean"], abs=1e-5)


def test_config_mismatch_fails_before_work(tmp_path):
    cfg_error = subprocess.run(
        [sys.executable, "-m", "fapo_megatron", "train", str(CONFIG), "parallel.tp=3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert cfg_error.returncode == 2 and "parallel.tp=3" in cfg_error.stderr
    with pytest.raises(Exception, match="trainer.stepz"):
        load_config(CONFIG, ["trainer.stepz=3"])


def test_checkpoints_are_named_by_the_trainer_step(fapo_run):
    """3 steps of 2 optimizer steps each (batch 4, mini-batch 2), checkpoint every 2: step_2, then step_3 at the end,
    each written once, the optimizer's own count (the LR schedule's position) kept beside it."""
    root = fapo_run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    meta = json.loads((root / "step_00000003" / "meta.json").read_text())
    assert (meta["step"], meta["optimizer_steps"]) == (3, 6)
    saves = [r.get("time/checkpoint", 0.0) > 0 for r in read_metrics(fapo_run / "metrics.jsonl")]
    assert saves == [False, False, True]  # a save's time is reported in the next step's row: only step 2's


def test_memory_ledger_follows_the_phase_order(fapo_run):
    """parallel.offload_actor (on in tiny_cpu): the actor is off the device while the engine generates and while
    the GenRM judges, holds parameters only for the log-prob pass and the weight push (gradients and optimizer state
    gone before the engine takes its weights back), and everything during the update."""
    for r in read_metrics(fapo_run / "metrics.jsonl"):
        assert r["memory/rollout/actor_bytes"] == 0 and r["memory/genrm/actor_bytes"] == 0, r
        params = r["memory/logprobs/actor_bytes"]
        assert params > 0 and r["memory/weight_sync/actor_bytes"] == params
        assert r["memory/weight_sync/actor_grads_optimizer_bytes"] == 0
        # fp32 Adam, no distributed optimizer at DP 1: gradients (4 B) and two moments (8 B) beside 4 B of params
        assert r["memory/update/actor_bytes"] == 4 * params


def test_streamed_verdicts_are_those_of_the_synchronous_path(warm_policy, tmp_path):
    """An external judge whose verdict is fixed by the solution it reads (the stand-in's `by_content`): streamed,
    requests leave while the rollout runs, every correct rollout is judged exactly once and each verdict lands on
    its own rollout, so counts, rewards and losses equal the synchronous path's from the same seed."""
    sys.path.insert(0, str(REPO / "tests" / "genrm"))
    from genrm_standin_server import StandinGenRM, content_verdict

    runs = {}
    for stream in (True, False):
        with StandinGenRM("sglang", delay_s=0.05, by_content=True) as judge:
            out = tmp_path / f"stream_{stream}"
            _ok(
                _train(
                    out,
                    warm_policy,
                    "trainer.steps=2",
                    "genrm.backend=external",
                    f"genrm.url={judge.url}",
                    f"genrm.stream={str(stream).lower()}",
                    "genrm.concurrency=4",
                    "genrm.retries=0",
                )
            )
            runs[stream] = read_metrics(out / "metrics.jsonl"), [body["text"] for body in judge.requests]
    (streamed, streamed_prompts), (synced, synced_prompts) = runs[True], runs[False]
    assert sum(r["genrm/sent_during_rollout"] for r in streamed) > 0, "no request left before the rollout ended"
    assert all(r["genrm/sent_during_rollout"] == 0 for r in synced)
    rollouts = 4 * 8
    for records, prompts in runs.values():
        assert len(prompts) == sum(r["genrm/asked"] - r["genrm/errors"] for r in records)  # one request each
        sent = 0
        for r in records:
            # Every correct rollout was asked about once; the step's requests reached the judge before the next
            # step's (the step waits for its verdicts), so the flawed count is that of this step's prompts.
            assert r["genrm/asked"] == pytest.approx(r["reward/accuracy"] * rollouts)
            step_prompts = prompts[sent : sent + int(r["genrm/asked"] - r["genrm/errors"])]
            sent += len(step_prompts)
            assert r["genrm/flawed"] == sum(content_verdict(p) == 0 for p in step_prompts)
    assert sorted(streamed_prompts) == sorted(synced_prompts)  # the same rollouts judged, none twice
    assert sum(r["genrm/flawed"] for r in streamed) > 0 and sum(r["genrm/clean"] for r in streamed) > 0
    for s, y in zip(streamed, synced, strict=True):
        for key in ("genrm/asked", "genrm/flawed", "genrm/clean", "reward/mean", "reward/advantage_abs_mean"):
            assert s[key] == y[key], key
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/ppo_kl"):
            assert s[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


def test_genrm_workers_on_their_own_pool_stream_verdicts(warm_policy, tmp_path):
    """GenRM workers on a pool of their own take requests during the rollout. The warmed policy serves as the
    GenRM model: the judge prompt is longer than its 512 positions, so each verdict is a counted error, which
    shows every correct rollout was asked about once and none was dropped unseen."""
    out = tmp_path / "separate"
    _ok(
        _train(
            out,
            warm_policy,
            "trainer.steps=2",
            "genrm.backend=embedded",
            f"genrm.model_path={warm_policy}",
            "genrm.placement=separate",
            "cluster.genrm_devices=1",
            "genrm.max_new_tokens=4",
            "genrm.unavailable_policy=treat_as_clean",
            "genrm.max_unavailable_fraction=1.0",
        )
    )
    records = read_metrics(out / "metrics.jsonl")
    for r in records:
        assert r["genrm/asked"] == pytest.approx(r["reward/accuracy"] * 4 * 8)
        assert r["genrm/errors"] == r["genrm/asked"] == r["reward/num_unavailable"]
    assert sum(r["genrm/sent_during_rollout"] for r in records) > 0
