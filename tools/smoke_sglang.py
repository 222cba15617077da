"""GPU smoke of the SGLang backend against a real server: run it on a GPU node before a first cluster run and after
upgrading SGLang.

python tools/smoke_sglang.py --model /path/to/small_hf_checkpoint [--tp 1] [--port 30000]

Launches `python -m sglang.launch_server` on the checkpoint through the project's own SGLangEngine and loads the same
checkpoint with HF transformers (bf16) as the reference, then checks:

  generate_logprobs   sampling returns tokens with one finite log-prob <= 0 each
  weight_push         a push of perturbed weights changes the greedy output; a push of the checkpoint's own weights
                      (SGLangEngine.update_weights) brings it back, and the served log-probs of sampled tokens agree
                      with the HF forward's (mean |difference| <= --logprob-tol; the max is printed)
  release_resume      release all memory, resume weights, push, resume the rest (slime's staging): same greedy output
  weight_version      /get_model_info serves the version of the last push, not the one it started with

Prints PASS/FAIL per check and exits 1 on any failure; exits 2 with one line when sglang or CUDA is missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["The capital of France is", "Question: what is 12 + 30? Answer:", "def fibonacci(n):"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Smoke-test the SGLang backend on a real server (GPU node).")
    parser.add_argument("--model", required=True, help="small HF checkpoint folder (the server and the reference)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the server (GPUs 0..tp-1)")
    parser.add_argument("--port", type=int, default=30000, help="port of the launched server (127.0.0.1)")
    parser.add_argument(
        "--mem-fraction", type=float, default=0.5, help="server mem_fraction_static; the HF reference shares GPU 0"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--logprob-tol", type=float, default=1e-3, help="bound on the mean |served - HF| log-prob")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if not 0 < args.mem_fraction < 1:
        parser.error(f"--mem-fraction must be in (0, 1), got {args.mem_fraction}")
    return args


def refusal(tp: int) -> str | None:
    """Why this machine cannot run the smoke (no sglang in the supported range, no CUDA, too few GPUs), or None."""
    from fapo_megatron.engine_protocol import EngineError
    from fapo_megatron.engines.sglang import require_sglang

    try:
        require_sglang()
    except EngineError as error:
        return str(error)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the SGLang smoke needs a GPU node"
    if torch.cuda.device_count() < tp:
        return f"--tp {tp} needs {tp} GPUs, {torch.cuda.device_count()} visible"
    return None


def reference_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each generated token from one unpadded HF forward (raw logits when T == 0)."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(token_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    start = len(prompt_ids) - 1
    return [logp[start + i, token].item() for i, token in enumerate(token_ids)]


def perturbed(named, seed: int = 0):
    """The weights plus Gaussian noise of half each tensor's spread: a push that must change what the server says."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)
            tensor = tensor + 0.5 * tensor.float().std().to(tensor.dtype) * noise
        yield name, tensor


def run_checks(engine, model, *, max_new_tokens: int = 32, logprob_tol: float = 1e-3) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each check, on a started engine serving the checkpoint `model` holds."""
    from fapo_megatron.engine_protocol import SamplingParams

    greedy_params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    sampled_params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=2)

    def own():
        """The checkpoint's own weights under their HF names, as one bucket list for update_weights."""
        return [list(model.state_dict().items())]

    def greedy():
        """From a cold prefix cache: a cache hit changes the prefill's numerics, which may flip a near-tie."""
        engine.client.flush_cache()
        return [g.token_ids for g in engine.generate(PROMPTS, greedy_params)]

    def logprob_gap(generations) -> tuple[float, float]:
        gaps = [
            abs(served - ref)
            for g in generations
            for served, ref in zip(g.logprobs, reference_logprobs(model, g.prompt_token_ids, g.token_ids, 1.0))
        ]
        return sum(gaps) / len(gaps), max(gaps)

    def generate_logprobs():
        generations = engine.generate(PROMPTS, sampled_params)
        assert len(generations) == 2 * len(PROMPTS), f"{len(generations)} generations for {2 * len(PROMPTS)} rows"
        for g in generations:
            assert g.token_ids and len(g.logprobs) == len(g.token_ids), f"prompt {g.prompt_index}: tokens/log-probs"
            assert all(math.isfinite(lp) and lp <= 1e-6 for lp in g.logprobs), f"prompt {g.prompt_index}: log-probs"
        mean, worst = logprob_gap(generations)
        tokens = sum(len(g.token_ids) for g in generations)
        return f"{tokens} tokens; served vs HF log-probs before any push: mean |diff| {mean:.2e} (max {worst:.2e})"

    def weight_push():
        baseline = greedy()
        engine.update_weights([list(perturbed(own()[0]))])
        assert greedy() != baseline, "greedy output unchanged after pushing perturbed weights: the push was ignored"
        engine.update_weights(own())
        assert greedy() == baseline, "greedy output differs after pushing the checkpoint's own weights back"
        mean, worst = logprob_gap(engine.generate(PROMPTS, sampled_params))
        assert mean <= logprob_tol, (
            f"served vs HF log-probs: mean |diff| {mean:.2e} > {logprob_tol:.0e} (max {worst:.2e})"
        )
        return f"served vs HF log-probs after the push: mean |diff| {mean:.2e} (max {worst:.2e})"

    def release_resume():
        before = greedy()
        engine.release_memory()
        engine.resume_memory(tags=["weights"])
        engine.update_weights(own())
        engine.resume_memory()
        after = greedy()
        assert after == before, "greedy output differs after release -> resume weights -> push -> resume the rest"
        return f"{len(after)} greedy outputs equal"

    started_with = engine.client.get_model_info().get("weight_version")

    def weight_version():
        served = engine.client.get_model_info().get("weight_version")
        assert served == str(engine.weight_version) != str(started_with), (
            f"/get_model_info weight_version {served!r} after {engine.weight_version} push(es) "
            f"({started_with!r} at start)"
        )
        return f"{started_with!r} -> {served!r}"

    results = []
    for check in (generate_logprobs, weight_push, release_resume, weight_version):
        try:
            results.append((check.__name__, True, check()))
        except Exception as error:  # each check reports what broke; the next one still runs
            results.append((check.__name__, False, f"{type(error).__name__}: {error}"))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = refusal(args.tp)
    if reason is not None:
        print(f"smoke_sglang: refused: {reason}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fapo_megatron.engines.sglang import SGLangEngine, SGLangServerArgs
    from fapo_megatron.engines.sglang_transport import TensorTransport

    server = SGLangServerArgs(
        model_path=args.model,
        tp_size=args.tp,
        port=args.port,
        mem_fraction_static=args.mem_fraction,
        dtype="bfloat16",
    )
    engine = SGLangEngine(
        server=server, tokenizer=AutoTokenizer.from_pretrained(args.model), startup_timeout_s=args.startup_timeout
    )
    try:
        engine.start()
        if args.tp > 1:  # each server TP rank reads a payload from its own GPU, as slime sends it
            devices = [torch.device(f"cuda:{rank}") for rank in range(args.tp)]
            engine.transport = TensorTransport(engine.client, tp_size=args.tp, rank_devices=devices)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to("cuda:0").eval()
        results = run_checks(engine, model, max_new_tokens=args.max_new_tokens, logprob_tol=args.logprob_tol)
    except Exception as error:
        results = [("launch", False, f"{type(error).__name__}: {error}")]
    finally:
        engine.shutdown()
    for name, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    failed = sum(not passed for _, passed, _ in results)
    print(f"smoke_sglang: {len(results) - failed}/{len(results)} checks passed (sglang {engine.server_version})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
