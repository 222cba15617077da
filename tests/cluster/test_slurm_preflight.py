"""Preflight checks: each failure names the node and the check; the all-reduce gathers every node's failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fapo_megatron.cluster.preflight import Failure, check_disk, check_gpus, check_job, check_paths, check_plan
from fapo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
SEVEN_B = REPO / "configs" / "qwen2.5-math-7b_fapo.yaml"


def hf_config(folder: Path, **shape) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
    }
    raw.update(shape)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_shipped_plan_passes_and_bad_splits_name_the_shape_and_key(tmp_path):
    assert check_plan(load_config(SEVEN_B), "n1") == []
    model = hf_config(tmp_path / "m")
    cfg = load_config(
        SEVEN_B,
        [
            f"model.path={model}",
            "parallel.tp=8",
            "parallel.pp=3",
            "cluster.num_nodes=3",
            "parallel.sequence_parallel=false",
            "rollout.tp=3",
            "algorithm.mini_batch_size=16",
            "data.batch_size=512",
            "parallel.micro_batch_size=1",
            "rollout.n=3",
        ],
    )
    messages = [str(f) for f in check_plan(cfg, "n1")]
    name = str(model / "config.json")
    assert f"[n1] plan: {name}: 28 attention heads not divisible by parallel.tp=8" in messages
    assert f"[n1] plan: {name}: 4 KV heads do not split over parallel.tp=8" in messages
    assert f"[n1] plan: {name}: 28 layers do not split into parallel.pp=3 stages" in messages
    assert f"[n1] plan: {name}: 28 attention heads not divisible by rollout.tp=3" in messages
    assert f"[n1] plan: {name}: 4 KV heads do not split over rollout.tp=3" in messages
    assert len(messages) == 5


def test_engines_may_replicate_kv_heads_but_megatron_may_not(tmp_path):
    model = hf_config(tmp_path / "m", num_attention_heads=32, num_key_value_heads=2)
    cfg = load_config(SEVEN_B, [f"model.path={model}", "parallel.tp=4", "rollout.tp=4"])
    messages = [f.message.split(": ", 1)[1] for f in check_plan(cfg, "n")]
    assert messages == ["2 KV heads do not split over parallel.tp=4"]


def test_node_local_checks_name_the_node(tmp_path):
    cfg = load_config(SEVEN_B, [f"trainer.output_dir={tmp_path}/run", "slurm.min_free_disk_gb=1000000000000.0"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    assert check_gpus(cfg, "gpu7", visible=4) == [
        Failure(
            "gpu7",
            "gpus",
            f"4 GPUs visible (CUDA_VISIBLE_DEVICES={visible}), the config wants cluster.devices_per_node=8",
        )
    ]
    assert check_gpus(cfg, "gpu7", visible=8) == []
    [disk] = check_disk(cfg, "gpu7")
    assert disk.check == "disk" and f"GB free under {tmp_path}," in disk.message
    paths = [str(f) for f in check_paths(cfg, "gpu7")]
    assert "[gpu7] paths: model.path: /shared/models/Qwen2.5-Math-7B/config.json does not exist on this node" in paths
    genrm = "/shared/models/FAPO-GenRM-4B/config.json"
    assert f"[gpu7] paths: genrm.model_path: {genrm} does not exist on this node" in paths
    assert len(paths) == 4  # + train and val data
    assert check_job(cfg, "gpu7", env={"SLURM_JOB_NUM_NODES": "3"}) == [
        Failure("gpu7", "job", "the job has 3 nodes, the config needs 4 (cluster.num_nodes=4 + GenRM pool)")
    ]
    assert check_job(cfg, "gpu7", env={"SLURM_JOB_NUM_NODES": "4"}) == []
    assert check_gpus(load_config(REPO / "configs" / "tiny_cpu.yaml"), "c") == []  # cpu mode: not applicable


def test_two_tasks_allreduce_and_rank0_reports_the_other_nodes_failure(tmp_path):
    """Two real processes over gloo; the data file exists only in node A's folder (a relative path)."""
    port = 29000 + os.getpid() % 1000
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text("{}\n")
    args = [
        sys.executable,
        "-m",
        "fapo_megatron",
        "slurm",
        "preflight",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        "data.format=gsm8k",
        "data.train_path=train.jsonl",
        "slurm.min_free_disk_gb=0",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]
    procs = []
    for rank, node in enumerate(["nodeA", "nodeB"]):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURMD_NODENAME=node)
        procs.append(
            subprocess.Popen(
                args,
                cwd=tmp_path / ("a" if rank == 0 else "b"),
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [1, 1], outs
    assert "preflight FAILED [nodeB] paths: data.train_path: train.jsonl does not exist on this node" in outs[0]
    assert "nodeA" not in outs[0].split("all-reduce")[0]  # node A's own checks passed
    assert "all-reduce of 1 MiB over 2 tasks" in outs[0]
    assert "1 failure(s)" in outs[0]
    assert "preflight FAILED" not in outs[1]  # only rank 0 prints the gathered report
