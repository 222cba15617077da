"""Parity gate: does a converted model compute what its source computed?

Runs an HF model and a megatron GPTModel (TP=1/PP=1, same dtype) on a few fixed prompts, compares next-token
logits over the real vocabulary (max abs diff, cosine similarity, top-1 agreement) and, to explain a failure,
every decoder layer's output hidden state: the first layer whose relative difference exceeds the tolerance is
where the weights diverge (errors only grow after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Fixed prompts for checkpoints that ship a tokenizer; tokenizer-less (random) models use seeded token ids.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Question: What is 12 times 7?\nAnswer:",
    "Once upon a time, in a small village,",
)


@dataclass(frozen=True)
class ParityThresholds:
    max_abs_diff: float = 1e-2
    """Largest allowed |logit difference| over all prompts, positions and real vocabulary entries."""
    min_cosine: float = 0.9999
    """Smallest allowed cosine similarity between the two logit vectors of one position."""
    min_top1_agreement: float = 0.99
    """Smallest allowed fraction of positions where both models predict the same next token."""
    layer_rtol: float = 1e-3
    """A decoder layer diverges when max |hidden difference| / max |source hidden| exceeds this."""

    def __post_init__(self):
        if self.max_abs_diff < 0 or self.layer_rtol < 0:
            raise ValueError("parity thresholds max_abs_diff and layer_rtol must be >= 0")
        if not (0 <= self.min_cosine <= 1 and 0 <= self.min_top1_agreement <= 1):
            raise ValueError("parity thresholds min_cosine and min_top1_agreement must lie in [0, 1]")


@dataclass
class ParityReport:
    max_abs_diff: float
    min_cosine: float
    top1_agreement: float
    layer_rel_diffs: list[float]
    """Per decoder layer: max relative difference of its output hidden state, over all prompts."""
    thresholds: ParityThresholds
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def first_diverging_layer(self) -> int | None:
        for index, rel in enumerate(self.layer_rel_diffs):
            if rel > self.thresholds.layer_rtol:
                return index
        return None

    def table(self) -> str:
        t = self.thresholds
        rows = [
            ("max |logit diff|", f"{self.max_abs_diff:.3e}", f"<= {t.max_abs_diff:.1e}"),
            ("min cosine", f"{self.min_cosine:.7f}", f">= {t.min_cosine}"),
            ("top-1 agreement", f"{self.top1_agreement:.4f}", f">= {t.min_top1_agreement}"),
            ("worst layer rel diff", f"{max(self.layer_rel_diffs, default=0.0):.3e}", f"<= {t.layer_rtol:.1e}"),
        ]
        lines = [f"{'metric':<22}{'value':>16}  threshold", "-" * 52]
        lines += [f"{name:<22}{value:>16}  {limit}" for name, value, limit in rows]
        lines.append("parity: PASS" if self.passed else "parity: FAIL - " + "; ".join(self.failures))
        return "\n".join(lines)


def prompt_ids(folder, vocab_size: int, num_random: int = 4, length: int = 16) -> list[list[int]]:
    """Token ids of PROMPTS with the folder's tokenizer, or seeded random ids when it has none."""
    from pathlib import Path

    if any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (num_random, length), generator=generator).tolist()


def _capture(layers, store: list):
    def hook(_module, _inputs, output):
        store.append(output[0] if isinstance(output, tuple) else output)

    return [layer.register_forward_hook(hook) for layer in layers]


@torch.no_grad()
def _run_hf(hf_model, ids: torch.Tensor):
    hidden: list[torch.Tensor] = []
    handles = _capture(hf_model.model.layers, hidden)
    try:
        logits = hf_model(ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, [h.reshape(ids.shape[1], -1) for h in hidden]


@torch.no_grad()
def _run_megatron(model, ids: torch.Tensor):
    hidden: list[torch.Tensor] = []
    handles = _capture(model.decoder.layers, hidden)
    device = next(model.parameters()).device
    try:
        ids = ids.to(device)
        positions = torch.arange(ids.shape[1], device=device)[None]
        logits = model(ids, positions, attention_mask=None)[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits.cpu(), [h.cpu().reshape(ids.shape[1], -1) for h in hidden]  # megatron hidden is [s, b, h]


def compare(hf_model, megatron_model, prompts: list[list[int]], thresholds: ParityThresholds) -> ParityReport:
    """Run both models on every prompt; the HF model is the reference."""
    vocab = hf_model.config.vocab_size
    max_abs, min_cos, agree, total = 0.0, 1.0, 0, 0
    layer_rel = [0.0] * len(hf_model.model.layers)
    non_finite: list[str] = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        ref_logits, ref_hidden = _run_hf(hf_model, ids)
        out_logits, out_hidden = _run_megatron(megatron_model, ids)
        ref_logits, out_logits = ref_logits.float(), out_logits[:, :vocab].float()
        for side, logits in (("HF", ref_logits), ("megatron", out_logits)):
            if side not in non_finite and not bool(torch.isfinite(logits).all()):
                non_finite.append(side)
        max_abs = max(max_abs, (ref_logits - out_logits).abs().max().item())
        min_cos = min(min_cos, torch.nn.functional.cosine_similarity(ref_logits, out_logits, dim=-1).min().item())
        agree += (ref_logits.argmax(-1) == out_logits.argmax(-1)).sum().item()
        total += ids.shape[1]
        for index, (ref, out) in enumerate(zip(ref_hidden, out_hidden)):
            rel = (ref.float() - out.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
            layer_rel[index] = max(layer_rel[index], rel.item())
    report = ParityReport(max_abs, min_cos, agree / max(total, 1), layer_rel, thresholds)
    # NaN compares False with every threshold (and max(0.0, nan) is 0.0): non-finite output fails by itself.
    report.failures += [f"non-finite logits on the {side} side" for side in non_finite]
    if max_abs > thresholds.max_abs_diff:
        report.failures.append(f"max |logit diff| {max_abs:.3e} > {thresholds.max_abs_diff:.1e}")
    if min_cos < thresholds.min_cosine:
        report.failures.append(f"min cosine {min_cos:.6f} < {thresholds.min_cosine}")
    if report.top1_agreement < thresholds.min_top1_agreement:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.3f} < {thresholds.min_top1_agreement}")
    layer = report.first_diverging_layer()
    if layer is not None:
        report.failures.append(f"first diverging layer: decoder layer {layer} (rel diff {layer_rel[layer]:.3e})")
    elif report.failures:
        report.failures.append("all decoder layers match: the final norm or output layer diverges")
    return report
