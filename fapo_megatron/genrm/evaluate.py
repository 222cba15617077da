"""GenRM quality on ProcessBench and FlawedPositiveBench, resumable: every verdict is appended to a jsonl log.

The judge sees each item exactly as the RL loop would show it a rollout (`to_judge_example`: the steps joined,
re-split with `split_steps`, tagged by `build_genrm_messages`). FlawedPositiveBench is the ProcessBench items whose
final answer is correct (1700, 521 of them flawed), so one pass over ProcessBench gives both benchmarks.

Resuming: a verdict whose status is `ok` or `unparseable` is the model's answer and is never asked again; a
timeout, error or unavailable verdict says nothing about the model and is asked again on the next run. The newest
record of an item wins. A run folder belongs to one judge (`run.json`): resuming with another model is refused.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fapo_megatron.genrm.processbench import load_step_labelled, processbench_metrics, to_judge_example
from fapo_megatron.genrm.types import Judge, JudgeRequest, Verdict, VerdictStatus

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
SPLIT_SIZES = {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
FINAL_STATUSES = (VerdictStatus.OK.value, VerdictStatus.UNPARSEABLE.value)
"""Statuses that are the model's own answer; the others are asked again when a run resumes."""
PAPER_ROWS = (
    ("FAPO-GenRM-4B", 87.5, 91.4, 89.4, 83.3),
    ("Qwen3-4B-Instruct", 69.4, 97.9, 81.2, 77.1),
    ("Qwen3-32B", 85.1, 90.8, 87.8, 82.0),
    ("Qwen2.5-Math-PRM-72B", 74.3, 91.0, 81.8, 76.8),
)
"""FAPO paper (FAPO.md): model, FlawedPositiveBench precision / recall / F1, ProcessBench F1 (percent)."""
VERDICTS_FILE, RUN_FILE, REPORT_JSON, REPORT_MD = "verdicts.jsonl", "run.json", "report.json", "report.md"


@dataclass(frozen=True)
class BenchExample:
    split: str
    item_id: str
    request: JudgeRequest
    label: int
    """Earliest wrong step on the steps the judge sees (-1: none)."""
    num_steps: int
    answer_correct: bool
    """The solution's final answer is right: the item belongs to FlawedPositiveBench."""


@dataclass
class VerdictRecord:
    """One line of verdicts.jsonl."""

    split: str
    id: str
    label: int
    num_steps: int
    answer_correct: bool
    status: str
    pred: int | None
    """The judge's index (None unless status is ok)."""
    output_tokens: int
    detail: str
    text: str
    """The judge's full output."""

    @classmethod
    def of(cls, example: BenchExample, verdict: Verdict) -> VerdictRecord:
        return cls(
            example.split,
            example.item_id,
            example.label,
            example.num_steps,
            example.answer_correct,
            verdict.status.value,
            verdict.first_error_step,
            verdict.output_tokens,
            verdict.detail,
            verdict.raw_text,
        )

    def verdict(self) -> Verdict:
        return Verdict(
            VerdictStatus(self.status),
            first_error_step=self.pred,
            num_steps=self.num_steps,
            output_tokens=self.output_tokens,
        )


# ---------------------------------------------------------------------------------------------- data


def bundled_split(split: str) -> list:
    """The StepLabelledItems of one ProcessBench split shipped in fapo_megatron/data/processbench/."""
    _check_split(split)
    resource = importlib.resources.files("fapo_megatron") / "data" / "processbench" / f"{split}.json"
    with importlib.resources.as_file(resource) as path:
        return load_step_labelled(path)


def load_examples(
    splits: Sequence[str] = SPLITS,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    max_steps: int = 32,
) -> list[BenchExample]:
    """The examples of `splits` (the first `limit` of each), from the bundled data or `data_dir/<split>.json[l]`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    examples = []
    for split in splits:
        items = bundled_split(split) if data_dir is None else load_step_labelled(_split_file(Path(data_dir), split))
        for item in items[:limit]:
            request, label, num_steps = to_judge_example(item, max_steps)
            examples.append(BenchExample(split, item.id, request, label, num_steps, item.final_answer_correct))
    return examples


def _split_file(data_dir: Path, split: str) -> Path:
    _check_split(split)
    for suffix in (".json", ".jsonl"):
        if (data_dir / f"{split}{suffix}").is_file():
            return data_dir / f"{split}{suffix}"
    raise FileNotFoundError(f"{data_dir}: no {split}.json or {split}.jsonl (ProcessBench-format split file)")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown ProcessBench split {split!r}; choose from {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------- the run


class VerdictLog:
    """verdicts.jsonl: appended one line per verdict and flushed to disk after every chunk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[tuple[str, str], VerdictRecord]:
        """The newest record per (split, id). A last line cut short by a crash is removed from the file."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        records = {}
        for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = VerdictRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{self.path}:{number}: not a verdict record ({err})") from None
            records[(record.split, record.id)] = record
        return records

    def append(self, records: Iterable[VerdictRecord]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record), ensure_ascii=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def check_run_identity(output_dir: Path, identity: dict) -> None:
    """Write run.json on the first run; refuse to resume a folder written by another judge or data set."""
    path = output_dir / RUN_FILE
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {before.get(k)!r} -> {identity.get(k)!r}" for k in changed)
            raise ValueError(f"{output_dir} holds verdicts of another judge ({diffs}); pick a new --output folder")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def run_evaluation(
    judge: Judge,
    examples: Sequence[BenchExample],
    output_dir: str | Path,
    *,
    identity: dict,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[VerdictRecord]:
    """Judge every example not yet answered in `output_dir`, appending as chunks finish; all records, in order."""
    from tqdm import tqdm

    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    output_dir = Path(output_dir)
    check_run_identity(output_dir, identity)
    log = VerdictLog(output_dir / VERDICTS_FILE)
    done = log.load()
    todo = [e for e in examples if (r := done.get((e.split, e.item_id))) is None or r.status not in FINAL_STATUSES]
    bar = tqdm(
        total=len(examples),
        initial=len(examples) - len(todo),
        desc="GenRM eval",
        unit="item",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            verdicts = judge.judge([example.request for example in chunk])
            if len(verdicts) != len(chunk):
                raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(chunk)} requests")
            records = [VerdictRecord.of(example, verdict) for example, verdict in zip(chunk, verdicts)]
            log.append(records)
            done.update({(r.split, r.id): r for r in records})
            bar.update(len(chunk))
    finally:
        bar.close()
    return [done[(e.split, e.item_id)] for e in examples]


# ---------------------------------------------------------------------------------------------- metrics


def summarize(records: Sequence[VerdictRecord], *, max_new_tokens: int | None = None) -> dict:
    """ProcessBench per split (+ average F1), FlawedPositiveBench over all splits, verdict counts, output lengths."""
    if not records:
        raise ValueError("no verdict records to summarize")
    splits = [s for s in SPLITS if any(r.split == s for r in records)]
    per_split = {}
    for split in splits:
        mine = [r for r in records if r.split == split]
        verdicts, labels = [r.verdict() for r in mine], [r.label for r in mine]
        metrics = processbench_metrics(verdicts, labels, [r.answer_correct for r in mine])
        per_split[split] = {
            "items": len(mine),
            "erroneous": sum(r.label != -1 for r in mine),
            "correct": sum(r.label == -1 for r in mine),
            "acc_erroneous": metrics["processbench/acc_erroneous"],
            "acc_correct": metrics["processbench/acc_correct"],
            "f1": metrics["processbench/f1"],
            "missing": int(metrics["missing"]),
        }
    overall = processbench_metrics(
        [r.verdict() for r in records], [r.label for r in records], [r.answer_correct for r in records]
    )
    positives = [r for r in records if r.answer_correct]
    flagged = [r for r in positives if r.pred is not None and r.pred != -1]
    return {
        "items": len(records),
        "complete": all(sum(r.split == s for r in records) == SPLIT_SIZES[s] for s in SPLITS),
        "status": {s.value: sum(r.status == s.value for r in records) for s in VerdictStatus},
        "processbench": {"splits": per_split, "average_f1": sum(m["f1"] for m in per_split.values()) / len(splits)},
        "fpb": {
            "items": len(positives),
            "flawed": sum(r.label != -1 for r in positives),
            "flagged": len(flagged),
            "true_positive": sum(r.label != -1 for r in flagged),
            "precision": overall["fpb/precision"],
            "recall": overall["fpb/recall"],
            "f1": overall["fpb/f1"],
            "missing": sum(r.status != VerdictStatus.OK.value for r in positives),
        },
        "output_tokens": _length_stats(records, max_new_tokens),
    }


def _length_stats(records: Sequence[VerdictRecord], max_new_tokens: int | None) -> dict:
    """Over the items the model answered (ok or unparseable); nearest-rank percentiles."""
    lengths = sorted(r.output_tokens for r in records if r.status in FINAL_STATUSES)
    if not lengths:
        return {"answered": 0}

    def rank(q: float) -> int:
        return lengths[max(0, math.ceil(q * len(lengths)) - 1)]

    stats = {
        "answered": len(lengths),
        "mean": sum(lengths) / len(lengths),
        "median": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": lengths[-1],
    }
    if max_new_tokens is not None:
        stats["at_budget"] = sum(length >= max_new_tokens for length in lengths)
    return stats


def markdown_report(summary: dict, *, name: str, judge_line: str = "") -> str:
    """The paper's rows with ours beneath, the per-split ProcessBench table, counts and output lengths."""
    fpb, pb = summary["fpb"], summary["processbench"]
    lines = [f"# GenRM evaluation: {name}", ""]
    if judge_line:
        lines += [judge_line, ""]
    if not summary["complete"]:
        lines += [
            f"**Partial run** ({summary['items']} of {sum(SPLIT_SIZES.values())} ProcessBench items, "
            f"{fpb['items']} of 1700 FlawedPositiveBench items): not comparable with the paper's rows.",
            "",
        ]
    lines += ["| model | FPB P | FPB R | FPB F1 | ProcessBench F1 |", "|---|---|---|---|---|"]
    lines += [f"| {model} (paper) | {p:.1f} | {r:.1f} | {f:.1f} | {pf:.1f} |" for model, p, r, f, pf in PAPER_ROWS]
    lines += [
        f"| **{name} (ours)** | {100 * fpb['precision']:.1f} | {100 * fpb['recall']:.1f} | "
        f"{100 * fpb['f1']:.1f} | {100 * pb['average_f1']:.1f} |",
        "",
    ]
    lines += ["| ProcessBench split | items | erroneous acc | correct acc | F1 | no verdict |", "|---" * 6 + "|"]
    for split, m in pb["splits"].items():
        lines.append(
            f"| {split} | {m['items']} | {100 * m['acc_erroneous']:.1f} | {100 * m['acc_correct']:.1f} | "
            f"{100 * m['f1']:.1f} | {m['missing']} |"
        )
    lines += [f"| average | | | | {100 * pb['average_f1']:.1f} | |", ""]
    lines.append(
        f"FlawedPositiveBench: {fpb['items']} items, {fpb['flawed']} flawed, {fpb['flagged']} flagged, "
        f"{fpb['true_positive']} flagged correctly, {fpb['missing']} without a verdict."
    )
    counts = ", ".join(f"{status} {count}" for status, count in summary["status"].items())
    lines += ["", f"Verdicts: {counts} (a missing verdict counts as a wrong index and as not flagged).", ""]
    tokens = summary["output_tokens"]
    if tokens["answered"]:
        budget = f"; at the output budget: {tokens['at_budget']}" if "at_budget" in tokens else ""
        lines.append(
            f"Output tokens over {tokens['answered']} answered items: mean {tokens['mean']:.0f}, median "
            f"{tokens['median']}, p90 {tokens['p90']}, p99 {tokens['p99']}, max {tokens['max']}{budget}."
        )
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | Path, summary: dict, markdown: str) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / REPORT_JSON, output_dir / REPORT_MD
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
