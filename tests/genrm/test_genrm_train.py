"""The GenRM training recipe: step-labelled prompts, the step-distance reward in the trainer's grading, the configs,
and the CPU example end to end (a real `fapo-megatron train` run)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fapo_megatron.config import AlgorithmConfig, ConfigError, GenRMConfig, OverlongConfig, RolloutConfig, load_config
from fapo_megatron.data import PromptItem
from fapo_megatron.engine_protocol import Generation
from fapo_megatron.experience import grade_rollouts
from fapo_megatron.genrm.prompt import build_genrm_prompt
from fapo_megatron.genrm.task import load_genrm_items, score_genrm_responses
from fapo_megatron.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def _item(label: int, num_steps: int, index: int = 0) -> PromptItem:
    return PromptItem(
        prompt="p",
        ground_truth=str(label),
        source="genrm_steps",
        index=index,
        meta={"label": label, "num_steps": num_steps, "final_answer_correct": True},
    )


def test_items_are_the_rl_time_prompt_with_the_label_on_its_steps(tmp_path):
    rows = [
        {
            "id": "a",
            "problem": "Q?",
            "steps": ["x\n\ny", "z", "w"],
            "label": 1,
            "final_answer_correct": True,
            "ground_truth": "7",
        },
        {
            "id": "b",
            "problem": "R?",
            "steps": ["u", "v"],
            "label": -1,
            "final_answer_correct": True,
            "ground_truth": "3",
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second = load_genrm_items(str(path), max_steps=32)
    # "x\n\ny" is two paragraphs at RL time, so the wrong step "z" is paragraph 2 of x, y, z, w
    assert first.prompt == build_genrm_prompt("Q?", ["x", "y", "z", "w"], "7")
    assert first.messages == [{"role": "user", "content": first.prompt}]
    assert (first.ground_truth, first.meta["label"], first.meta["num_steps"]) == ("2", 2, 4)
    assert (second.ground_truth, second.meta["num_steps"], second.index) == ("-1", 2, 1)
    merged = load_genrm_items(str(path), max_steps=2)[0]  # x,y | z,w: the wrong step is merged step 1
    assert (merged.meta["label"], merged.meta["num_steps"]) == (1, 2)


def test_step_distance_reward_by_hand():
    items = [_item(-1, 4), _item(2, 4), _item(2, 4), _item(1, 4), _item(0, 2)]
    texts = ["\\boxed{-1}", "so \\boxed{3}", "\\boxed{-1}", "no box", "\\boxed{5}"]
    scores = score_genrm_responses(items, texts)
    # clean and -1: +1 | off by one of 4 steps: 1 - 1/4 | flawed but -1: -1 | unparseable: -1 | out of range: -1
    assert scores.rewards.tolist() == [1.0, 0.75, -1.0, -1.0, -1.0]
    assert scores.exact.tolist() == [True, False, False, False, False]
    assert scores.metrics["genrm_task/unparseable_share"] == pytest.approx(2 / 5)
    assert scores.metrics["genrm_task/flagged_share"] == pytest.approx(1 / 5)
    assert (scores.metrics["genrm_task/acc_erroneous"], scores.metrics["genrm_task/acc_correct"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="not a GenRM training item"):
        score_genrm_responses([PromptItem(prompt="p", ground_truth="1", source="math", index=3)], ["\\boxed{1}"])


def test_trainer_grading_uses_the_step_reward_and_group_advantages():
    items = [_item(1, 4, 0), _item(-1, 3, 1)]
    answers = [
        (0, "\\boxed{1}", 3),
        (0, "\\boxed{3}", 3),
        (0, "\\boxed{-1}", 10),
        (1, "\\boxed{-1}", 3),
        (1, "\\boxed{0}", 3),
    ]
    generations = [
        Generation(prompt_index=p, token_ids=[5] * n, text=t, logprobs=[0.0] * n, finish_reason="stop")
        for p, t, n in answers
    ]
    algorithm = AlgorithmConfig(name="grpo", reward="genrm_step", overlong=OverlongConfig(enable=True, buffer=4))
    graded = grade_rollouts(
        items,
        generations,
        torch.zeros(5, dtype=torch.bool),
        None,
        algorithm=algorithm,
        rollout=RolloutConfig(max_response_tokens=10),
        genrm=GenRMConfig(),
    )
    # step distance: 1, 1 - 2/4, -1 | 1, -1 ; overlong (limit 10, buffer 4): the 10-token answer gets -(10 - 6)/4
    expected = torch.tensor([1.0, 0.5, -1.0 - 1.0, 1.0, -1.0])
    assert torch.allclose(graded.rewards, expected)
    group0, group1 = expected[:3], expected[3:]
    advantages = torch.cat(
        [(group0 - group0.mean()) / (group0.std() + 1e-6), (group1 - group1.mean()) / (group1.std() + 1e-6)]
    )
    assert torch.allclose(graded.advantages, advantages, atol=1e-5)
    assert graded.keep.all() and graded.correct.tolist() == [True, False, False, True, False]
    metrics = graded.metrics
    assert metrics["reward/step_distance_mean"] == pytest.approx(0.5 / 5)
    assert metrics["reward/accuracy"] == pytest.approx(0.4)
    assert metrics["reward/overlong_mean"] == pytest.approx(-1 / 5)
    assert math.isnan(metrics["reward/flawed_positive_share"])  # not defined for a GenRM's own answers


def test_configs_validate_and_refuse_half_a_recipe():
    cfg = load_config(REPO / "configs/fapo_genrm_4b_train.yaml")
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.optim.lr, cfg.data.batch_size) == (16, 1.2, 1e-6, 512)
    assert (cfg.algorithm.reward, cfg.data.format, cfg.algorithm.name) == ("genrm_step", "genrm_steps", "grpo")
    load_config(REPO / "examples/genrm_train_tiny.yaml", ["data.train_path=x.jsonl"])
    tiny = REPO / "configs/tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="needs both algorithm.reward=genrm_step and data.format=genrm_steps"):
        load_config(tiny, ["algorithm.reward=genrm_step"])
    with pytest.raises(ConfigError, match="set algorithm.name=grpo"):
        load_config(REPO / "configs/fapo_genrm_4b_train.yaml", ["algorithm.name=fapo"])


@pytest.mark.timeout(600)
def test_tiny_example_trains_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/genrm_train_tiny.py"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--items",
            "64",
            "--warmup-steps",
            "10",
            "trainer.progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=550,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = read_metrics(out / "train" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert -1.0 <= r["reward/mean"] <= 1.0 and r["reward/mean"] == pytest.approx(r["reward/step_distance_mean"])
        assert 0.0 <= r["genrm_task/unparseable_share"] <= 1.0
        assert r["reward/flawed_positive_share"] is None and "genrm/asked" not in r  # no judge in GenRM training
    assert "mean reward, first 1 steps" in proc.stdout
