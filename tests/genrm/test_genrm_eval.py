"""The GenRM evaluator: metric arithmetic against hand-computed values, resuming, the CLI over HTTP and in-process."""

import json
from pathlib import Path

import pytest
from genrm_standin_server import StandinGenRM

from fapo_megatron.cli import main
from fapo_megatron.genrm.evaluate import (
    PAPER_ROWS,
    VERDICTS_FILE,
    VerdictLog,
    load_examples,
    markdown_report,
    run_evaluation,
    summarize,
)
from fapo_megatron.genrm.prompt import split_steps
from fapo_megatron.genrm.types import Verdict, VerdictStatus
from fapo_megatron.genrm.verdict import parse_verdict

REPO = Path(__file__).resolve().parents[2]
STEPS = ["a = 1", "b = 2", "c = 3"]
# id -> (label, final answer correct, what the judge answers, output tokens)
CASES = {
    "gsm8k": {
        "g1": (-1, True, "\\boxed{-1}", 10),  # clean, called clean
        "g2": (1, True, "\\boxed{1}", 20),  # flawed positive, exact index
        "g3": (2, False, "\\boxed{0}", 30),  # wrong answer, wrong index
        "g4": (-1, True, "\\boxed{2}", 40),  # clean, false alarm
    },
    "math": {
        "m1": (0, True, "\\boxed{-1}", 50),  # flawed positive, missed
        "m2": (1, True, "no box here", 60),  # flawed positive, unparseable
        "m3": (-1, True, "\\boxed{-1}", 70),  # clean, called clean
        "m4": (2, False, "timeout", 0),  # no answer at all
    },
}


def _write_data(folder: Path, cases=CASES, problem_suffix=lambda answer: "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in cases.items():
        entries = [
            {
                "id": item_id,
                "problem": f"problem {item_id}{problem_suffix(answer)}",
                "steps": STEPS,
                "label": label,
                "final_answer_correct": correct,
                "ground_truth": "3",
            }
            for item_id, (label, correct, answer, _) in items.items()
        ]
        (folder / f"{split}.json").write_text(json.dumps(entries))
    return folder


class ScriptedJudge:
    """Answers each problem with its scripted text (or a timeout); records what it was asked."""

    def __init__(self, fail_after_calls: int | None = None):
        self.script = {f"problem {i}": (a, t) for items in CASES.values() for i, (_, _, a, t) in items.items()}
        self.asked: list[str] = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def judge(self, requests):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        verdicts = []
        for request in requests:
            self.asked.append(request.problem.split()[-1])
            text, tokens = self.script[request.problem]
            num_steps = len(split_steps(request.solution))
            if text == "timeout":
                verdicts.append(Verdict(VerdictStatus.TIMEOUT, num_steps=num_steps, detail="scripted"))
            else:
                verdicts.append(parse_verdict(text, num_steps, output_tokens=tokens))
        return verdicts


IDENTITY = {"model_path": "scripted"}


def test_metrics_by_hand(tmp_path):
    examples = load_examples(("gsm8k", "math"), data_dir=_write_data(tmp_path / "data"))
    records = run_evaluation(ScriptedJudge(), examples, tmp_path / "run", identity=IDENTITY, progress=False)
    summary = summarize(records, max_new_tokens=60)
    gsm8k, math = summary["processbench"]["splits"]["gsm8k"], summary["processbench"]["splits"]["math"]
    # gsm8k: erroneous g2 hit, g3 miss -> 1/2; correct g1 hit, g4 miss -> 1/2; F1 1/2
    assert (gsm8k["acc_erroneous"], gsm8k["acc_correct"], gsm8k["f1"]) == (0.5, 0.5, 0.5)
    # math: erroneous m1, m2, m4 all missed -> 0; correct m3 hit -> 1; F1 0
    assert (math["acc_erroneous"], math["acc_correct"], math["f1"]) == (0.0, 1.0, 0.0)
    assert (math["erroneous"], math["correct"], math["missing"]) == (3, 1, 2)
    assert summary["processbench"]["average_f1"] == 0.25
    # FPB = answer-correct items g1 g2 g4 m1 m2 m3; flawed g2 m1 m2; flagged g2 g4; true positive g2
    fpb = summary["fpb"]
    assert (fpb["items"], fpb["flawed"], fpb["flagged"], fpb["true_positive"], fpb["missing"]) == (6, 3, 2, 1, 1)
    assert fpb["precision"] == 0.5 and fpb["recall"] == pytest.approx(1 / 3)
    assert fpb["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert summary["status"] == {"ok": 6, "unparseable": 1, "timeout": 1, "error": 0, "unavailable": 0}
    # answered (ok + unparseable): 10..70; nearest-rank median = 4th = 40, p90 = 7th = 70; >= 60 tokens: two
    tokens = summary["output_tokens"]
    assert (tokens["answered"], tokens["mean"], tokens["median"], tokens["p90"], tokens["max"]) == (7, 40, 40, 70, 70)
    assert tokens["at_budget"] == 2
    assert summary["items"] == 8 and not summary["complete"]

    markdown = markdown_report(summary, name="scripted")
    assert "| **scripted (ours)** | 50.0 | 33.3 | 40.0 | 25.0 |" in markdown
    for model, p, r, f, pb in PAPER_ROWS:
        assert f"| {model} (paper) | {p:.1f} | {r:.1f} | {f:.1f} | {pb:.1f} |" in markdown
    assert "| math | 4 | 0.0 | 100.0 | 0.0 | 2 |" in markdown and "Partial run" in markdown


def test_resume_asks_only_what_is_missing(tmp_path):
    examples = load_examples(("gsm8k", "math"), data_dir=_write_data(tmp_path / "data"))
    run = tmp_path / "run"
    crashing = ScriptedJudge(fail_after_calls=1)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(crashing, examples, run, identity=IDENTITY, chunk_size=3, progress=False)
    assert crashing.asked == ["g1", "g2", "g3"]
    with (run / VERDICTS_FILE).open("a") as handle:  # a crash in the middle of a write
        handle.write('{"split": "gsm8k", "id": "g4", "lab')
    second = ScriptedJudge()
    records = run_evaluation(second, examples, run, identity=IDENTITY, chunk_size=3, progress=False)
    assert second.asked == ["g4", "m1", "m2", "m3", "m4"]
    assert [r.id for r in records] == ["g1", "g2", "g3", "g4", "m1", "m2", "m3", "m4"]
    # The timed-out item is asked again; answered and unparseable ones are not.
    third = ScriptedJudge()
    run_evaluation(third, examples, run, identity=IDENTITY, progress=False)
    assert third.asked == ["m4"]
    assert len(VerdictLog(run / VERDICTS_FILE).load()) == 8
    assert summarize(records) == summarize(
        run_evaluation(ScriptedJudge(), examples, run, identity=IDENTITY, progress=False)
    )
    with pytest.raises(ValueError, match="another judge.*model_path: 'scripted' -> 'other'"):
        run_evaluation(ScriptedJudge(), examples, run, identity={"model_path": "other"}, progress=False)


def test_corrupt_log_line_is_named(tmp_path):
    path = tmp_path / VERDICTS_FILE
    path.write_text('{"split": "gsm8k"}\nnot json\n')
    with pytest.raises(ValueError, match=f"{VERDICTS_FILE}:1: not a verdict record"):
        VerdictLog(path).load()


def test_bundled_data_is_processbench_and_flawed_positive_bench():
    examples = load_examples()
    assert len(examples) == 3400
    positives = [e for e in examples if e.answer_correct]
    assert len(positives) == 1700 and sum(e.label != -1 for e in positives) == 521
    assert [len(load_examples((s,), limit=2)) for s in ("gsm8k", "omnimath")] == [2, 2]


def _directive(answer: str) -> str:
    """The stand-in server's directive that makes it give `answer`: the boxed index, or prose without a box."""
    box = "\\boxed{"
    return answer[len(box) : -1] if answer.startswith(box) else "garbage"


def test_cli_over_http_with_split_and_limit(tmp_path):
    """`eval-genrm` against an OpenAI-compatible stand-in answering `[[judge:N]]` directives in the problem."""
    cases = {split: dict(list(items.items())[:3]) for split, items in CASES.items()}
    data = _write_data(tmp_path / "data", cases, problem_suffix=lambda answer: f" [[judge:{_directive(answer)}]]")
    out = tmp_path / "out"
    with StandinGenRM("openai") as server:
        args = [
            "eval-genrm",
            str(REPO / "configs/genrm_eval_external.yaml"),
            f"genrm.url={server.url}",
            "genrm.api=openai",
            "--data",
            str(data),
            "--output",
            str(out),
            "--split",
            "math",
            "--limit",
            "2",
            "--quiet",
        ]
        assert main(args) == 0
        asked = len(server.requests)
        assert main(args) == 0 and len(server.requests) == asked == 2  # resumed: nothing asked again
    report = json.loads((out / "report.json").read_text())
    # m1: label 0, answered -1 (missed); m2: label 1, garbage (unparseable); both answer-correct and flawed
    assert report["status"]["ok"] == 1 and report["status"]["unparseable"] == 1
    assert report["processbench"]["splits"]["math"]["acc_erroneous"] == 0.0
    assert (report["fpb"]["items"], report["fpb"]["flawed"], report["fpb"]["recall"]) == (2, 2, 0.0)
    assert "| **127.0.0.1_" in (out / "report.md").read_text()


def test_cli_tiny_embedded_model_counts_unparseable(tmp_path, capsys):
    """A real model run: a tiny random Llama (greedy) never boxes an index, so every verdict is unparseable."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fapo_megatron.data.arith_tokenizer import arith_tokenizer

    torch.manual_seed(0)
    tokenizer = arith_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = [
        "eval-genrm",
        str(REPO / "configs/genrm_eval_smollm2_cpu.yaml"),
        f"genrm.model_path={model_dir}",
        "genrm.max_new_tokens=6",
        "genrm.temperature=0",
        "--split",
        "gsm8k",
        "--limit",
        "3",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 3 and report["status"]["unparseable"] == 3
    assert report["output_tokens"]["answered"] == 3 and 1 <= report["output_tokens"]["max"] <= 6
    records = [json.loads(line) for line in (out / VERDICTS_FILE).read_text().splitlines()]
    assert [r["id"] for r in records] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert all(r["status"] == "unparseable" and r["text"] for r in records)
    assert "unparseable 3" in capsys.readouterr().out


def test_program_backend_is_refused(capsys):
    assert main(["eval-genrm", str(REPO / "configs/tiny_cpu.yaml"), "--limit", "1"]) == 2
    assert "ProcessBench needs a model GenRM" in capsys.readouterr().err
