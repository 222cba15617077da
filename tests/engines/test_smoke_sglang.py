"""tools/smoke_sglang.py: it refuses cleanly where SGLang is missing, parses its arguments, and its checks (run
here on the project's SGLangEngine in front of the protocol stand-in, with the tiny checkpoint as the HF reference)
pass on a server that serves that checkpoint and fail on one that serves another."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import tiny_qwen2
from test_engines_sglang import checkpoints, launch  # noqa: F401  (checkpoints is a fixture)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "smoke_sglang.py"
spec = importlib.util.spec_from_file_location("smoke_sglang", TOOL)
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)


def test_refuses_in_one_line_without_sglang(tmp_path):
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--model", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smoke_sglang: refused: the SGLang backend needs sglang>=0.5.3")


def test_argument_parsing():
    args = smoke.parse_args(["--model", "/m", "--tp", "2", "--port", "31000", "--logprob-tol", "2e-3"])
    assert (args.model, args.tp, args.port, args.logprob_tol) == ("/m", 2, 31000, 2e-3)
    defaults = smoke.parse_args(["--model", "/m"])
    assert (defaults.tp, defaults.port, defaults.mem_fraction, defaults.logprob_tol) == (1, 30000, 0.5, 1e-3)
    for bad in (
        [],
        ["--model", "/m", "--tp", "0"],
        ["--model", "/m", "--port", "70000"],
        ["--model", "/m", "--tp", "x"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            smoke.parse_args(bad)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("reference_seed, failing", [(0, set()), (1, {"weight_push"})])
def test_checks_pass_on_the_served_checkpoint_only(checkpoints, reference_seed, failing):  # noqa: F811
    engine = launch(checkpoints[0])
    try:
        results = smoke.run_checks(engine, tiny_qwen2(seed=reference_seed), max_new_tokens=8)
    finally:
        engine.shutdown()
    assert [name for name, _, _ in results] == ["generate_logprobs", "weight_push", "release_resume", "weight_version"]
    assert {name for name, passed, _ in results if not passed} == failing, results
