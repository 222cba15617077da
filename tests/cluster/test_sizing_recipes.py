"""Every shipped GPU recipe's header states the per-GPU memory `fapo-megatron slurm size` computes for it: each
phase's total and every component the header names, so the two cannot drift apart."""

import re
from pathlib import Path

import pytest

from fapo_megatron.cluster.sizing import estimate_for_config
from fapo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if "slurm size configs/" in p.read_text())
PHASES = {"actor train": "actor train", "rollout": "rollout", "weight sync": "weight sync", "GenRM": "genrm"}
COMPONENTS = {  # the header's word -> sizing's component (None: the engine's "<model> weights" line)
    "actor params": "actor params",
    "engine weights": "engine weights",
    "params": "params",
    "grads": "grads",
    "optimizer": "optimizer",
    "activations": "activations",
    "logits": "logits",
    "overhead": "runtime overhead",
    "buckets": "bucket",
    "KV": "KV cache",
    "weights": None,
}
NUMBER = r"(\d+(?:\.\d+)?)"


def header_phases(path: Path) -> dict[str, str]:
    """Phase label -> its text (continuation lines joined) from the header's per-GPU memory block."""
    lines = path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if "slurm size configs/" in line)
    blocks: dict[str, str] = {}
    label = None
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            if blocks:
                break
            continue  # the block's title may run on
        body = line[1:]
        match = re.match(r"\s{3}(actor train|rollout|weight sync|GenRM(?: pool)?)\s+(.*)", body)
        if match:
            label = match.group(1)
            blocks[label] = match.group(2)
        elif label is not None and body.startswith("    "):
            blocks[label] += " " + body.strip()
        else:
            break
    return blocks


def matches(stated: str, computed: float) -> bool:
    """`stated` is `computed` rounded to the digits the header gives."""
    digits = len(stated.split(".")[1]) if "." in stated else 0
    return abs(float(stated) - computed) <= 0.5 * 10**-digits + 1e-9


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_matches_slurm_size(path):
    cfg = load_config(path)
    report = estimate_for_config(cfg)
    computed = {p.name.replace(" (own pool)", ""): p for p in report.phases}
    blocks = header_phases(path)
    assert {PHASES[label.replace(" pool", "")] for label in blocks} == set(computed), (path.name, list(blocks))
    for label, text in blocks.items():
        phase = computed[PHASES[label.replace(" pool", "")]]
        total = re.search(NUMBER + r" GB\s*$", text)
        assert total and matches(total.group(1), phase.total_gb), (path.name, label, text, phase.total_gb)
        lines = {name: gb for name, gb, _ in phase.lines}
        rest = text
        for word, component in COMPONENTS.items():  # longest names first, each taken out once matched
            for found in re.finditer(rf"\b{word} {NUMBER}", rest):
                name = component or next(n for n in lines if n.endswith(" weights") and n != "engine weights")
                assert matches(found.group(1), lines[name]), (path.name, label, word, found.group(1), lines[name])
            rest = re.sub(rf"\b{word} {NUMBER}", "", rest)
        pool = re.search(rf"pool {NUMBER} x {NUMBER} = {NUMBER}", text)
        if pool:
            fraction = cfg.genrm.mem_fraction if label.startswith("GenRM") else cfg.rollout.mem_fraction
            assert float(pool.group(1)) == fraction and float(pool.group(2)) == cfg.sizing.gpu_memory_gb
            assert matches(pool.group(3), fraction * cfg.sizing.gpu_memory_gb), (path.name, label)


def test_the_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5-math-7b_fapo.yaml", "qwen2.5-32b_fapo.yaml", "qwen2.5-32b_grpo.yaml"} <= names
