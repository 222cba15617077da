from pathlib import Path

import pytest

from fapo_megatron.cli import main
from fapo_megatron.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    assert isinstance(load_config(path), Config)


def test_defaults_match_the_paper():
    cfg = load_config()
    assert (cfg.algorithm.lam, cfg.algorithm.clip_low, cfg.algorithm.clip_high) == (1.0, 0.2, 0.28)
    assert cfg.algorithm.dual_clip_c == 10.0 and cfg.algorithm.loss_agg_mode == "token-mean"
    assert cfg.rollout.n == 8 and cfg.algorithm.overlong.buffer == 4096
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.1 and cfg.optim.clip_grad == 1.0


def test_override_changes_a_nested_value():
    cfg = load_config(None, ["algorithm.lam=0.5", "algorithm.overlong.enable=false", "trainer.output_dir=/tmp/x"])
    assert cfg.algorithm.lam == 0.5 and cfg.algorithm.overlong.enable is False
    assert cfg.trainer.output_dir == "/tmp/x"


def test_exponent_without_dot_is_a_number():
    assert load_config(None, ["optim.lr=5e-5"]).optim.lr == 5e-5


def test_unknown_key_names_path_and_closest_names():
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm.clip_lo'.*did you mean clip_low"):
        load_config(None, ["algorithm.clip_lo=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algorthm'.*did you mean algorithm"):
        load_config(None, ["algorthm.lam=1"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"'rollout.temprature'.*did you mean temperature"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.lam=abc", r"algorithm.lam='abc' must be a number"),
        ("parallel.tp=2.5", r"parallel.tp=2.5 must be an integer"),
        ("algorithm.overlong.enable=maybe", r"must be true or false"),
        ("algorithm.loss_agg_mode=mean", r"choose one of \['token-mean'"),
        ("genrm.unavailable_policy=ignore", r"choose one of \['treat_as_clean', 'treat_as_flawed', 'drop', 'fail'\]"),
    ],
)
def test_wrong_type_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.clip_low=-1"], r"algorithm.clip_low=-1.0 is out of range"),
        (["algorithm.dual_clip_c=0.5"], r"dual_clip_c=0.5: must be > 1"),
        (["rollout.top_p=0"], r"rollout.top_p=0.0 is out of range"),
        (["cluster.devices_per_node=2", "parallel.tp=3"], r"parallel.tp=3 x parallel.pp=1 = 3 does not divide the 2"),
        (["data.batch_size=10", "algorithm.mini_batch_size=4"], r"mini_batch_size=4 must divide data.batch_size=10"),
        (["genrm.backend=external"], r"needs genrm.url"),
        (["data.format=gsm8k"], r"needs data.train_path"),
    ],
)
def test_bad_range_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", str(CONFIGS[0]), "parallel.tp=3"]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "override,message",
    [
        ("algorithm.lam=nan", "algorithm.lam='nan' must be a finite number"),
        ("optim.lr=inf", "optim.lr='inf' must be a finite number"),
        ("rollout.temperature=.nan", "rollout.temperature=nan must be a finite number"),
        ("genrm.deadline_s=-.inf", "genrm.deadline_s=-inf must be a finite number"),
        ("rollout.n=1", "rollout.n=1 must be >= 2"),
        ("rollout.top_k=0", "rollout.top_k=0 is not allowed; use -1 (off) or a k >= 1"),
        ("trainer.val_top_p=5", "trainer.val_top_p=5.0 is out of range"),
        ("trainer.val_temperature=-1", "trainer.val_temperature=-1.0 is out of range"),
        ("genrm.temperature=-0.5", "genrm.temperature=-0.5 is out of range"),
        ("rollout.sglang_port=99999", "rollout.sglang_port=99999 is out of range"),
        ("cluster.master_port=99999", "cluster.master_port=99999 is out of range"),
        ("genrm.max_unavailable_fraction=1.5", "genrm.max_unavailable_fraction=1.5 is out of range"),
        ("trainer.output_dir=", "trainer.output_dir is empty"),
        (
            "trainer.resume=autp",
            "trainer.resume='autp': not auto, none or an existing checkpoint path (did you mean auto?)",
        ),
    ],
)
def test_bad_values_rejected_at_load_naming_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_top_k_minus_one_and_positive_k_accepted():
    assert load_config(None, ["rollout.top_k=-1"]).rollout.top_k == -1
    assert load_config(None, ["rollout.top_k=20"]).rollout.top_k == 20


def test_key_given_twice_on_command_line_rejected():
    with pytest.raises(
        ConfigError, match=r"override algorithm.lam given twice \('algorithm.lam=0.5' and 'algorithm.lam=2'\)"
    ):
        load_config(None, ["algorithm.lam=0.5", "algorithm.lam=2"])


def test_yaml_duplicate_keys_empty_file_and_non_utf8_name_file_and_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("algorithm:\n  lam: 0.5\n  clip_low: 0.1\n  lam: 2.0\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4: key 'lam' given twice"):
        load_config(dup)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty"):
        load_config(empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"algorithm:\n  lam: 0.5\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:3: not UTF-8 \(byte 0xe9\)"):
        load_config(latin)


def _train_cli(capsys, tmp_path, *overrides):
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    code = main(["train", str(config), f"trainer.output_dir={tmp_path / 'run'}", "trainer.progress=false", *overrides])
    return code, capsys.readouterr().err.strip()


def test_data_and_checkpoint_errors_print_one_line_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    code, err = _train_cli(capsys, tmp_path, "data.format=math", f"data.train_path={bad}")
    assert code == 2 and err == f"fapo-megatron: data error: {bad}:1: not UTF-8 (byte 0xe9 at column 17)"
    empty_root = tmp_path / "ckpts"
    (empty_root / "step_00000004.tmp").mkdir(parents=True)
    code, err = _train_cli(capsys, tmp_path, f"trainer.resume={empty_root}")
    assert code == 2 and err.startswith(f"fapo-megatron: checkpoint error: {empty_root}: not a checkpoint")
    assert "\n" not in err


def test_full_disk_is_named_as_such():
    from fapo_megatron.megatron.checkpoint_files import torch_save

    with pytest.raises(OSError, match="No space left on device writing /dev/full") as err:
        torch_save({"w": list(range(10000))}, "/dev/full")  # the kernel's always-full device
    assert err.value.errno == 28


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "parallel.overlap_param_gather=true",
                "parallel.overlap_grad_reduce=true",
                "parallel.use_distributed_optimizer=false",
            ],
            r"overlap_param_gather=true needs parallel.use_distributed_opt",
        ),
        (["parallel.overlap_param_gather=true"], r"overlap_param_gather=true needs .*overlap_grad_reduce=true"),
        (["parallel.ddp_bucket_size=1000"], r"ddp_bucket_size=1000 only applies with parallel.overlap_grad_reduce"),
        (["parallel.ddp_bucket_size=-1"], r"parallel.ddp_bucket_size=-1 is out of range"),
        (["model.dtype=float32", "parallel.grad_reduce_in_fp32=false"], r"grad_reduce_in_fp32=false changes nothing"),
        (["optim.exp_avg_dtype=bfloat16"], r"optim.exp_avg_dtype=bfloat16 needs optim.precision_aware=true"),
        (["optim.cpu_offload_fraction=1.5"], r"optim.cpu_offload_fraction=1.5 is out of range"),
        (["optim.cpu_offload_fraction=0.5"], r"cpu_offload_fraction=0.5 needs optim.precision_aware=true"),
        (
            ["optim.precision_aware=true", "parallel.use_distributed_optimizer=false", "cluster.device=cuda"],
            r"precision_aware=true needs parallel.use_distributed_optimizer=true",
        ),
        (["optim.precision_aware=true"], r"precision_aware=true needs cluster.device=cuda with Transformer Engine"),
        (["optim.precision_aware=true", "optim.cpu_offload_fraction=0.5"], r"0.5 needs cluster.device=cuda"),
        (
            ["optim.precision_aware=true", "optim.cpu_offload_fraction=0.5", "optim.exp_avg_sq_dtype=bfloat16"],
            r"keeps fp32 Adam moments: optim.exp_avg_sq_dtype=bfloat16 would not apply",
        ),
    ],
)
def test_ddp_and_optimizer_combinations_megatron_refuses_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_ddp_and_optimizer_options_accepted_together():
    overrides = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true", "cluster.device=cuda"]
    overrides += ["parallel.ddp_bucket_size=20000000", "parallel.grad_reduce_in_fp32=false"]
    overrides += ["optim.precision_aware=true", "optim.cpu_offload_fraction=1.0"]
    cfg = load_config(None, overrides)
    assert cfg.parallel.ddp_bucket_size == 20_000_000 and cfg.optim.cpu_offload_fraction == 1.0
