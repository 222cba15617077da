"""`fapo-megatron eval-genrm CONFIG [key=value ...]`: a GenRM's quality on ProcessBench and FlawedPositiveBench.

The judge is the one the config's `genrm` section builds for training (embedded HF model, SGLang server of
genrm.model_path, or an external OpenAI-compatible / SGLang-router URL), with the same prompt and step split.
Verdicts go to OUTPUT/verdicts.jsonl as they come; running the same command again resumes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fapo_megatron.config import Config, ConfigError, load_config
from fapo_megatron.genrm.evaluate import SPLITS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-genrm", help="evaluate a GenRM on ProcessBench / FlawedPositiveBench (resumable)"
    )
    parser.add_argument(
        "config", help="YAML config whose genrm section names the judge, e.g. configs/genrm_eval_fapo_genrm_4b.yaml"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. genrm.max_new_tokens=8192")
    parser.add_argument(
        "--split", action="append", choices=SPLITS, help="a ProcessBench split (repeatable; default: all four)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N items of each split")
    parser.add_argument("--output", default=None, help="run folder (default: runs/eval_genrm/<model name>)")
    parser.add_argument(
        "--data",
        default=None,
        help="folder of ProcessBench-format <split>.json files to use "
        "instead of the bundled ones (e.g. a copy with ground-truth answers)",
    )
    parser.add_argument("--name", default=None, help="the model's name in the report (default: from the config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fapo_megatron.genrm.evaluate import (
        load_examples,
        markdown_report,
        run_evaluation,
        summarize,
        write_report,
    )

    cfg = load_config(args.config, args.overrides)
    genrm = cfg.genrm
    if genrm.backend == "program":
        raise ConfigError(
            "genrm.backend=program only checks the arithmetic-chain task; ProcessBench needs a model GenRM "
            "(genrm.backend=embedded, sglang or external)"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be >= 1")
    name = args.name or judge_name(cfg)
    output = Path(args.output or Path("runs") / "eval_genrm" / name)
    examples = load_examples(args.split or SPLITS, data_dir=args.data, limit=args.limit, max_steps=genrm.max_steps)
    identity = {
        "backend": genrm.backend,
        "model_path": genrm.model_path,
        "url": genrm.url,
        "api": genrm.api,
        "temperature": genrm.temperature,
        "max_new_tokens": genrm.max_new_tokens,
        "max_steps": genrm.max_steps,
        "data": str(Path(args.data).resolve()) if args.data else "bundled",
    }
    with _judge(cfg) as judge:
        records = run_evaluation(
            judge, examples, output, identity=identity, chunk_size=genrm.concurrency, progress=not args.quiet
        )
    summary = summarize(records, max_new_tokens=genrm.max_new_tokens)
    judge_line = (
        f"Judge: genrm.backend={genrm.backend}, {genrm.model_path or genrm.url}, temperature "
        f"{genrm.temperature}, max_new_tokens {genrm.max_new_tokens}, max_steps {genrm.max_steps}."
    )
    markdown = markdown_report(summary, name=name, judge_line=judge_line)
    json_path, md_path = write_report(output, summary, markdown)
    print(markdown, end="")
    print(f"\nwrote {json_path} and {md_path}; verdicts in {output / 'verdicts.jsonl'}")
    return 0


def judge_name(cfg: Config) -> str:
    """The model's folder name, or the external endpoint's host and port."""
    genrm = cfg.genrm
    if genrm.model_path:
        return Path(genrm.model_path.rstrip("/")).name
    return genrm.url.split("://", 1)[-1].strip("/").replace("/", "_").replace(":", "_") or "external"


@contextlib.contextmanager
def _judge(cfg: Config):
    """The config's judge; an engine it starts (embedded / sglang) is shut down on exit, whatever happens."""
    from fapo_megatron.genrm.build import build_judge

    if cfg.genrm.backend == "external":
        yield build_judge(cfg.genrm)
        return
    from fapo_megatron.cluster.placement import GENRM, compute_layout
    from fapo_megatron.roles.genrm import build_genrm_engine

    engine = build_genrm_engine(cfg, compute_layout(cfg).engines[GENRM][0])  # this process: the first replica
    try:
        engine.start()
        yield build_judge(cfg.genrm, engine)
    finally:
        engine.shutdown()
