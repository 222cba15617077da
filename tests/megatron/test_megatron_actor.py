"""Multi-process (gloo, CPU, fp32) checks of the megatron actor against HF transformers and a single-process step.

Each job launches 2 or 4 ranks of mcore_worker.py, which run several parallel layouts in the same processes and
leave rank 0's results in files; the assertions here compare them with independent references.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from fapo_megatron.algo import ppo_loss

sys.path.insert(0, str(Path(__file__).parent))
from megatron_testlib import launch_ranks, launched_processes, make_batch, rank_logs, tiny_hf_model  # noqa: E402

WORKER = Path(__file__).parent / "mcore_worker.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mcore")
    tiny_hf_model("qwen2", 1).save_pretrained(root / "hf_qwen2")
    tiny_hf_model("qwen3", 2).save_pretrained(root / "hf_qwen3")
    tiny_hf_model("qwen2", 3, hidden_size=96).save_pretrained(root / "hf_qwen2_wide")
    return root


@pytest.fixture(scope="module")
def results(workdir):
    """Run a job once per module and return a reader of its outputs."""
    done: set[str] = set()

    def get(scenario: str, world: int, name: str, expect_codes=(0,)):
        if scenario not in done:
            codes = launch_ranks(WORKER, scenario, world, workdir)
            assert all(code in expect_codes for code in codes), (
                f"{scenario} exit codes {codes}\n{rank_logs(workdir, scenario, world)}"
            )
            done.add(scenario)
        return torch.load(workdir / "out" / f"{name}.pt", weights_only=False)

    return get


def _hf_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(batch.tokens).logits.float() / temperature
    picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    valid = batch.attention_mask.clone()
    valid[:, 0] = False
    return torch.nn.functional.pad(picked, (1, 0)) * valid


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_logprobs_match_hf_under_tp_pp(results, workdir, family):
    batch = make_batch()
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / f"hf_{family}").float().eval()
    reference = _hf_logprobs(model, batch, temperature=0.7)
    assert reference.abs().sum() > 0
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"):
        got = results("parity", 4, f"parity_{family}_{layout}")
        diff = (got["logprobs"] - reference).abs().max().item()
        assert diff <= 1e-4, f"{family} {layout}: max |logprob - HF| = {diff}"
        assert got["entropy"].min() >= 0 and got["entropy"].max() <= torch.log(torch.tensor(128.0)) + 1e-4
    onloaded = results("parity", 4, f"onload_{family}")
    assert torch.equal(onloaded, results("parity", 4, f"parity_{family}_tp2pp2")["logprobs"])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_hf_weights_round_trips_exactly(results, workdir, family):
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / f"hf_{family}").float()
    source = model.state_dict()
    got = results("parity", 4, f"export_{family}")
    tied = model.config.tie_word_embeddings
    assert set(got) == set(source) - ({"lm_head.weight"} if tied else set())
    for name, tensor in got.items():
        assert torch.equal(tensor, source[name]), name
    fresh = transformers.AutoModelForCausalLM.from_config(model.config)
    missing, unexpected = fresh.load_state_dict(got, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}


def _reference_train_step(workdir: Path, batch, lr=1e-3, weight_decay=0.1, clip=1.0) -> dict[str, torch.Tensor]:
    """The same FAPO step in one process: HF model, torch AdamW with megatron's no-decay rule, global clip."""
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf_qwen2").float().train()
    old = _hf_logprobs(model, batch)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() == 1]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    for start in range(0, len(batch), 4):
        rows = slice(start, start + 4)
        mini = batch.select(rows)
        optim.zero_grad()
        logits = model(mini.tokens).logits.float()
        picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, mini.tokens[:, 1:, None])[..., 0]
        logprobs = torch.nn.functional.pad(picked, (1, 0))
        loss, _ = ppo_loss(
            logprobs,
            old[rows],
            mini.advantages,
            mini.response_mask,
            tis_cap=2.0,
            rollout_logprobs=mini.rollout_logprobs,
            num_tokens=mini.num_response_tokens,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optim.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_train_step_same_update_under_tp_pp(results, workdir):
    batch = make_batch()
    reference = _reference_train_step(workdir, batch)
    initial = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf_qwen2").float().state_dict()
    runs = {layout: results("train", 2, f"train_{layout}") for layout in ("tp1pp1", "tp2pp1", "tp1pp2")}
    for layout, run in runs.items():
        moved = max((run["weights"][n] - initial[n]).abs().max().item() for n in run["weights"])
        assert moved > 1e-4, f"{layout}: the step did not change the weights"
        for name, tensor in run["weights"].items():
            diff = (tensor - reference[name]).abs().max().item()
            assert diff <= 1e-5, f"{layout}: {name} differs from the single-process step by {diff}"
        metrics = run["metrics"]
        assert metrics["optimizer_steps"] == 2 and metrics["lr"] == pytest.approx(1e-3)
        assert metrics["grad_norm"] > 0 and 0 <= metrics["pg_clipfrac"] <= 1
    assert runs["tp2pp1"]["metrics"]["loss"] == pytest.approx(runs["tp1pp1"]["metrics"]["loss"], abs=1e-5)
    # every TP rank's slice of a split weight counts once in the norm (Adam's first step hides a wrong clip)
    for layout in ("tp2pp1", "tp1pp2"):
        assert runs[layout]["metrics"]["grad_norm"] == pytest.approx(runs["tp1pp1"]["metrics"]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_packed_micro_batches_take_the_padded_step(results, mode):
    budgets = {"tp1pp1": 20, "tp2pp1": 14, "tp1pp2": 32}
    for layout, budget in budgets.items():
        padded = results("packing", 2, f"pack_{layout}_{mode}_0")
        packed = results("packing", 2, f"pack_{layout}_{mode}_{budget}")
        # 8 rows of lengths 16 11 9 16 6 13 16 10: padded 16 columns each, packed into [1, <= budget] or one row
        assert {shape[1] for shape in padded["shapes"]} == {16}
        assert all(rows == 1 and (tokens <= budget or tokens == 16) for rows, tokens in packed["shapes"])
        assert sum(tokens for _, tokens in packed["shapes"]) < sum(r * t for r, t in padded["shapes"])
        if mode == "token-mean":
            diff = (packed["logprobs"] - padded["logprobs"]).abs().max().item()
            assert diff <= 1e-5, f"{layout}: packed log-probs differ from padded by {diff}"
        for name, tensor in padded["weights"].items():
            diff = (packed["weights"][name] - tensor).abs().max().item()
            assert diff <= 1e-5, f"{layout} {mode}: {name} after a packed step differs by {diff}"
        for name in ("loss", "kl_loss", "grad_norm", "tis_ratio_max", "local_num_tokens"):
            assert packed[name] == pytest.approx(padded[name], rel=1e-5, abs=1e-7), f"{layout} {mode}: {name}"


def test_checkpoint_reshards_and_names_mismatch(results):
    saved = results("checkpoint", 2, "ckpt_tp2")
    for layout in ("tp1pp1", "tp1pp2"):
        loaded = results("checkpoint", 2, f"ckpt_load_{layout}")
        assert loaded["extra"] == {"data_position": 7}
        diff = (loaded["logprobs"] - saved).abs().max().item()
        assert diff <= 1e-5, f"TP2 checkpoint loaded at {layout}: log-probs differ by {diff}"
    message = results("checkpoint", 2, "ckpt_mismatch")
    assert "embedding.word_embeddings.weight" in message and "(128, 96)" in message, message


def test_checkpoint_at_tp2_keeps_adam_moments_at_tp1(results):
    """The distributed optimizer's fully-reshardable format: saved at TP2 x DP1, loaded at TP1 x DP2, every
    parameter's exp_avg / exp_avg_sq is the saved one, and the next step is the uninterrupted TP2 step."""
    saved = results("checkpoint", 2, "ckpt_tp2_moments")
    loaded = results("checkpoint", 2, "ckpt_load_tp1pp1")
    assert set(loaded["moments"]) == set(saved)
    assert max(t.abs().max().item() for name, t in saved.items() if name.endswith("exp_avg_sq")) > 0
    for name, tensor in saved.items():
        rows = min(tensor.shape[0], loaded["moments"][name].shape[0])  # vocabulary padding may differ with TP
        assert torch.equal(loaded["moments"][name][:rows], tensor[:rows]), name
    uninterrupted = results("checkpoint", 2, "uninterrupted")
    assert loaded["next"]["loss"] == pytest.approx(uninterrupted["loss"], abs=1e-6)
    for name, tensor in results("checkpoint", 2, "uninterrupted_weights").items():
        diff = (loaded["next_weights"][name] - tensor).abs().max().item()
        assert diff <= 1e-5, f"{name}: the step after the TP change differs by {diff}"


def test_async_checkpoint_writes_in_background_and_resumes_the_same(results):
    """trainer.async_checkpoint at DP2 with shard writes slowed by 8 s: the save returns long before the files are
    written, the folder is not complete and `latest` does not name it until then (a second save's neither, up to
    close, which waits), and a resume from it equals a resume from the synchronous save of the same step, although
    training changed the parameters while it was written."""
    slow = 8.0
    timeline = results("async_checkpoint", 2, "async_timeline")
    assert timeline["returned_s"] < slow / 2, timeline
    assert timeline["written_s"] >= slow, timeline
    assert timeline["while_writing"] == {"complete": [], "latest": None}
    assert timeline["published"] == "step_00000001"
    assert timeline["after_finish"] == {"complete": [1], "latest": "step_00000001"}
    assert timeline["second_writing"] == {"complete": [1], "latest": "step_00000001"}
    assert timeline["after_close"] == {"complete": [1, 2], "latest": "step_00000002"}
    sync = results("async_checkpoint", 2, "resumed_sync")
    resumed = results("async_checkpoint", 2, "resumed_async")
    assert resumed["extra"] == sync["extra"] == {"data_position": 3}
    for part in ("weights", "moments", "next_weights"):
        assert set(resumed[part]) == set(sync[part])
        for name, tensor in sync[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}/{name} differs after the async save"
    assert resumed["next"] == sync["next"]


def test_fully_parallel_save_builds_megatron_wrapper_over_dp(results):
    """trainer.fully_parallel_save wraps the torch_dist strategy in megatron's FullyParallelSaveStrategyWrapper over
    the DP group (2 ranks); off, the plain strategy. (The async test's checkpoint was written through it.)"""
    assert results("async_checkpoint", 2, "strategy_default") == "TorchDistSaveShardedStrategy"
    assert results("async_checkpoint", 2, "strategy_parallel") == ["FullyParallelSaveStrategyWrapper", 2]


def test_restart_after_kill_continues_exactly(results, workdir):
    uninterrupted = results("checkpoint", 2, "uninterrupted")
    codes = launch_ranks(WORKER, "crash", 2, workdir)
    assert codes == [-9, -9], codes
    # Nothing the killed ranks started (megatron-core's checkpoint-writer Manager servers) outlives them.
    deadline = time.monotonic() + 10.0
    while (left := launched_processes(workdir, "crash")) and time.monotonic() < deadline:
        time.sleep(0.25)
    described = [f"{process.pid} {' '.join(process.cmdline())[:100]}" for process in left]
    for process in left:
        process.kill()
    assert not left, f"still running 10 s after the ranks' SIGKILL: {described}"
    restarted = results("restart", 2, "restarted")
    assert restarted["extra"] == {"data_position": 1} and restarted["optimizer_steps"] == 4
    assert restarted["metrics"]["loss"] == pytest.approx(uninterrupted["loss"], abs=1e-6)
    assert restarted["metrics"]["grad_norm"] == pytest.approx(uninterrupted["grad_norm"], rel=1e-5)


def test_non_finite_update_stops_or_is_skipped_never_applied(results):
    """2 DP ranks, each NaN on one rank's rows only: both ranks refuse the update (a Megatron step would clip by a NaN
    norm and write NaN into every weight)."""
    stop = results("non_finite", 2, "non_finite_stop")
    assert stop["error"].startswith("optimizer step 1: non-finite loss or gradient") and stop["unchanged"]
    skip = results("non_finite", 2, "non_finite_skip")
    assert skip["skipped"] == 2.0 and math.isnan(skip["grad_norm"]) and skip["unchanged"]
    assert skip["changed_after_good"]


def test_ddp_options_build_what_they_name_and_keep_the_step(results):
    """At DP2: overlapped reduce and gather, bucket size and bf16 gradients reach megatron's DDP wrapper; the
    overlapped step is the plain one (a sum of two ranks' gradients in any bucket order), and with the gather
    overlapped the step still ends with whole, updated parameters."""
    plain = results("actor_options", 2, "options_plain")
    config = plain["ddp_config"]
    assert not config["overlap_grad_reduce"] and not config["overlap_param_gather"] and config["bucket_size"] is None
    assert config["grad_reduce_in_fp32"] and plain["bucket_groups"] == 1 and plain["forward_pre_hooks"] == 0
    assert plain["moved"] > 1e-4
    overlap = results("actor_options", 2, "options_overlap_grad")
    assert overlap["ddp_config"]["overlap_grad_reduce"] and overlap["ddp_config"]["bucket_size"] == 40_000_000
    small = results("actor_options", 2, "options_small_buckets")
    assert small["ddp_config"]["bucket_size"] == 4096 and small["bucket_groups"] > 4
    both = results("actor_options", 2, "options_overlap_both")
    assert both["ddp_config"]["overlap_param_gather"] and both["forward_pre_hooks"] > 0
    for run in (overlap, small, both):
        for name, tensor in plain["weights"].items():
            diff = (run["weights"][name] - tensor).abs().max().item()
            assert diff <= 1e-6, f"{run['ddp_config']}: {name} differs from the plain step by {diff}"
        assert run["metrics"]["loss"] == pytest.approx(plain["metrics"]["loss"], abs=1e-7)
    fp32_grads = results("actor_options", 2, "options_bf16_fp32_grads")
    bf16_grads = results("actor_options", 2, "options_bf16_grads")
    assert fp32_grads["grad_dtypes"] == ["torch.float32"] and "torch.bfloat16" in bf16_grads["grad_dtypes"]
    assert not bf16_grads["ddp_config"]["grad_reduce_in_fp32"]
    assert bf16_grads["moved"] > 1e-4 and math.isfinite(bf16_grads["metrics"]["grad_norm"])


def test_chunked_logprobs_take_the_same_step(results):
    """Log-probs five positions at a time (16-token rows): the same step and log-probs, also with the entropy bonus
    (whose gradient the chunked backward computes itself)."""
    for chunked, whole in (("chunked", "plain"), ("entropy_chunked", "entropy")):
        got, want = results("actor_options", 2, f"options_{chunked}"), results("actor_options", 2, f"options_{whole}")
        assert (got["logprobs"] - want["logprobs"]).abs().max() <= 1e-6
        for name, tensor in want["weights"].items():
            diff = (got["weights"][name] - tensor).abs().max().item()
            # Adam's first steps are ~lr * sign(g): float32 round-off in a tiny gradient element moves a weight
            # by more than the round-off itself (the packed-step test's bound)
            assert diff <= 1e-5, f"{chunked}: {name} differs from the unchunked step by {diff}"
        for metric in ("entropy", "loss"):
            assert got["metrics"][metric] == pytest.approx(want["metrics"][metric], rel=1e-6, abs=1e-8), metric
    plain, entropy = results("actor_options", 2, "options_plain"), results("actor_options", 2, "options_entropy")
    assert max((entropy["weights"][n] - t).abs().max().item() for n, t in plain["weights"].items()) > 1e-6


def test_optimizer_config_default_is_plain_fp32_adam():
    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.model import optimizer_config

    plain = load_config(None, [])
    built = optimizer_config(plain.optim, plain.model.dtype, plain.parallel)
    assert not built.use_precision_aware_optimizer and not built.optimizer_cpu_offload and built.bf16
    assert built.exp_avg_dtype == built.exp_avg_sq_dtype == torch.float32


def test_optimizer_config_carries_precision_aware_and_cpu_offload():
    """megatron-core builds a precision-aware OptimizerConfig only with Transformer Engine installed."""
    pytest.importorskip("transformer_engine.pytorch.optimizers")
    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.model import optimizer_config

    cfg = load_config(None, ["cluster.device=cuda", "optim.precision_aware=true", "optim.cpu_offload_fraction=0.25"])
    built = optimizer_config(cfg.optim, cfg.model.dtype, cfg.parallel)
    assert built.use_precision_aware_optimizer and built.use_distributed_optimizer
    assert built.optimizer_cpu_offload and built.optimizer_offload_fraction == 0.25


def test_optimizer_config_low_precision_moments_with_transformer_engine():
    pytest.importorskip("transformer_engine.pytorch.optimizers")
    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.model import optimizer_config

    overrides = ["cluster.device=cuda", "optim.precision_aware=true", "optim.exp_avg_dtype=bfloat16"]
    cfg = load_config(None, overrides + ["optim.exp_avg_sq_dtype=float16"])
    built = optimizer_config(cfg.optim, cfg.model.dtype, cfg.parallel)
    assert built.use_precision_aware_optimizer and not built.optimizer_cpu_offload
    assert (built.exp_avg_dtype, built.exp_avg_sq_dtype) == (torch.bfloat16, torch.float16)


def test_precision_aware_without_transformer_engine_is_named():
    import importlib.util

    from fapo_megatron.config import load_config
    from fapo_megatron.megatron.model import optimizer_config

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed")
    cfg = load_config(None, ["cluster.device=cuda", "optim.precision_aware=true"])
    with pytest.raises(RuntimeError, match="optim.precision_aware=true needs Transformer Engine"):
        optimizer_config(cfg.optim, cfg.model.dtype, cfg.parallel)
