"""A GenRM replica as a worker: an engine serving the flaw detector plus the client that asks it.

Colocated runs place these on the policy's devices (they sleep while the policy generates and trains);
`genrm.placement=separate` gives them a pool of their own. The trainer splits a step's requests over them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fapo_megatron.cluster.placement import EnginePlacement
from fapo_megatron.config import Config, from_dict
from fapo_megatron.genrm.build import build_judge
from fapo_megatron.genrm.types import JudgeRequest, Verdict
from fapo_megatron.phases import RESIDENCY


def build_genrm_engine(cfg: Config, engine: EnginePlacement):
    """The engine behind a model GenRM (embedded HF model or an SGLang server of genrm.model_path) on the devices
    and port placement gave it (`engine`)."""
    genrm = cfg.genrm
    if not genrm.model_path:
        raise ValueError(f"genrm.backend={genrm.backend} needs genrm.model_path (the GenRM checkpoint folder)")
    if genrm.backend == "sglang":
        from fapo_megatron.engines.sglang import SGLangEngine, SGLangServerArgs

        server = SGLangServerArgs(
            model_path=genrm.model_path,
            tp_size=genrm.tp,
            mem_fraction_static=genrm.mem_fraction,
            port=engine.port,
            base_gpu_id=engine.base_gpu_id,
            skip_tokenizer_init=False,
            enable_weights_cpu_backup=True,  # nobody pushes GenRM weights: released ones must come back from host
        )
        return SGLangEngine(
            server=server, request_timeout_s=genrm.request_timeout_s, retries=genrm.retries, frozen=True
        )
    import torch

    from fapo_megatron.engines.embedded import EmbeddedEngine

    device = "cuda" if cfg.cluster.device == "cuda" else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return EmbeddedEngine(genrm.model_path, device=device, dtype=dtype)


class GenRMWorker:
    """Built in the genrm phase (the trainer has the colocated rollout engines and actors off the device first), so
    the engine sizes its KV pool on a free device; then it follows phases.RESIDENCY through `enter`."""

    def __init__(self, cfg_dict: dict, engine: EnginePlacement):
        self.cfg = from_dict(Config, cfg_dict)
        self.engine = build_genrm_engine(self.cfg, engine)
        self.engine.start()
        self.judge_client = build_judge(self.cfg.genrm, self.engine)
        self.phase = "genrm"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        return self.judge_client.judge(requests)

    def enter(self, phase: str) -> None:
        """Hold what the table gives a GenRM engine in `phase`: everything in the genrm phase, else released (what
        the engine's release_memory gives back)."""
        awake, wanted = bool(RESIDENCY[self.phase].genrm), bool(RESIDENCY[phase].genrm)
        if awake and not wanted:
            self.engine.release_memory()
        elif wanted and not awake:
            self.engine.resume_memory()
        self.phase = phase

    def close(self) -> None:
        self.engine.shutdown()
