"""`fapo-megatron slurm submit --dry-run`: the sbatch script and sbatch commands a config turns into."""

import subprocess
from pathlib import Path

import pytest

from fapo_megatron.cli import main
from fapo_megatron.cluster.slurm import fill_template, job_num_nodes, sbatch_commands
from fapo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
SEVEN_B = str(REPO / "configs" / "qwen2.5-math-7b_fapo.yaml")


def dry_run(capsys, *args: str) -> str:
    assert main(["slurm", "submit", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_gpu_script_carries_the_flags_and_passes_bash_syntax_check(capsys, tmp_path):
    script = dry_run(
        capsys,
        SEVEN_B,
        "trainer.steps=50",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--qos",
        "high",
        "--time",
        "04:00:00",
        "--socket-ifname",
        "ib0",
        "--container-image",
        "nvcr.io#fapo:latest",
        "--container-mounts",
        "/lustre:/lustre",
        "--log-dir",
        str(tmp_path / "logs"),
    )
    lines = script.splitlines()
    for directive in (
        "--nodes=4",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--time=04:00:00",
        "--signal=B:USR1@900",
        "--requeue",
        "--open-mode=append",
        "--exclusive",
        f"--output={tmp_path / 'logs'}/%x-%j.out",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    for export in (
        "export NCCL_SOCKET_IFNAME=ib0",
        "export GLOO_SOCKET_IFNAME=ib0",
        "export FAPO_REQUEUE=launcher",
        "export FAPO_RAY_GPUS=8",
    ):
        assert export in lines, export
    assert (
        "STEP_ARGS=(--gres=gpu:8 '--container-image=nvcr.io#fapo:latest' "
        f"--container-workdir={Path.cwd()} --container-mounts=/lustre:/lustre)" in lines
    )
    # the trainer and the preflight get the same config: the file, the overrides, and the flags as overrides
    assert f"TRAIN_ARGS=({SEVEN_B} trainer.steps=50 slurm.partition=gpu" in script
    assert "--ntasks-per-node=8" in script  # preflight: one task per GPU
    assert "--resource GPU --per-node 8" in script
    assert 'cluster.ray_address="$FAPO_RAY_ADDRESS" trainer.resume=auto' in script
    assert "{{" not in script
    body = script.split("# submit with:")[0]
    (tmp_path / "job.sbatch").write_text(body)
    check = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # two chained jobs (the recipe's slurm.chain=2): the second waits for the first to end in any state
    submits = [line for line in lines if line.startswith("#   sbatch")]
    assert len(submits) == 2 and "--dependency=afterany:{prev}" in submits[1]


def test_cpu_script_venv_no_requeue_no_signal(capsys, tmp_path):
    script = dry_run(
        capsys,
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "slurm.signal_lead_s=0",
        "slurm.env=[RAY_AUTH_MODE=disabled]",
        "--venv",
        "/opt/venv",
        "--no-requeue",
        "--log-dir",
        str(tmp_path),
    )
    assert "#SBATCH --no-requeue" in script and "export FAPO_REQUEUE=off" in script
    assert "--signal" not in script and "--gpus-per-node" not in script and "--gres" not in script
    assert "export FAPO_SETUP='source /opt/venv/bin/activate'" in script
    assert "export RAY_AUTH_MODE=disabled" in script
    assert "--resource CPU --per-node 2" in script and "--ntasks-per-node=1 " in script


def test_array_chain_runs_one_element_at_a_time(tmp_path):
    cfg = load_config(SEVEN_B, ["slurm.chain=3", "slurm.chain_mode=array"])
    assert sbatch_commands(cfg, tmp_path / "x.sbatch") == [
        ["sbatch", "--parsable", "--array=0-2%1", str(tmp_path / "x.sbatch")]
    ]


def test_a_separate_genrm_pool_adds_its_nodes():
    assert job_num_nodes(load_config(REPO / "configs" / "fapo_genrm_4b_separate.yaml")) == 2
    assert job_num_nodes(load_config(REPO / "configs" / "fapo_genrm_4b.yaml")) == 1
    assert job_num_nodes(load_config(SEVEN_B, ["cluster.num_nodes=2"])) == 2


def test_a_separate_rollout_pool_adds_its_nodes():
    actor = load_config(SEVEN_B, ["cluster.devices_per_node=8"])
    separate = ["rollout.placement=separate", "cluster.devices_per_node=8"]
    assert job_num_nodes(actor) == actor.cluster.num_nodes
    assert job_num_nodes(load_config(SEVEN_B, [*separate, "cluster.rollout_devices=8"])) == actor.cluster.num_nodes + 1
    assert (
        job_num_nodes(load_config(SEVEN_B, [*separate, "cluster.rollout_devices=12"])) == actor.cluster.num_nodes + 2
    )


def test_template_placeholders_must_match_the_values():
    assert fill_template("a {{x}} b", {"x": "1"}, "t") == "a 1 b"
    with pytest.raises(ValueError, match=r"t: placeholders \['x', 'y'\] do not match the values \['x'\]"):
        fill_template("{{x}} {{y}}", {"x": "1"}, "t")


def test_a_bad_flag_value_is_a_config_error_naming_the_key(capsys):
    assert main(["slurm", "submit", SEVEN_B, "--chain", "0", "--dry-run"]) == 2
    assert "slurm.chain=0 must be > 0" in capsys.readouterr().err
