"""The trainer's sampling and answer checker come from the config, each resolved once."""

from pathlib import Path

from fapo_megatron.config import load_config
from fapo_megatron.trainer import VAL_SEED_STRIDE, Trainer, sampling_params

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def test_sampling_params_carry_the_rollout_and_validation_keys():
    cfg = load_config(
        CONFIG,
        [
            "rollout.temperature=0.9",
            "rollout.top_p=0.8",
            "rollout.top_k=5",
            "rollout.n=3",
            "rollout.max_response_tokens=40",
            "trainer.val_temperature=0.6",
            "trainer.val_top_p=0.5",
            "trainer.val_n=2",
        ],
    )
    rollout, validation = sampling_params(cfg)
    assert (rollout.temperature, rollout.top_p, rollout.top_k, rollout.n) == (0.9, 0.8, 5, 3)
    assert (validation.temperature, validation.top_p, validation.top_k, validation.n) == (0.6, 0.5, -1, 2)
    assert rollout.max_new_tokens == validation.max_new_tokens == 40


def test_trainer_seeds_per_step_and_sizes_the_checker(tmp_path):
    cfg = load_config(CONFIG, [f"trainer.output_dir={tmp_path}", "trainer.seed=11", "trainer.answer_check_workers=3"])
    trainer = Trainer(cfg)
    try:
        assert trainer.checker.num_workers == 3
        trainer.step = 4
        assert trainer.sampling(validation=False).seed == 11 + 4
        assert trainer.sampling(validation=True).seed == 11 + VAL_SEED_STRIDE * 4
        assert trainer.rollout_params.seed is None  # the run's parameters stay unseeded; each step gets its own
    finally:
        trainer.checker.close()
