"""Model FLOPs of the actor, the numerator of MFU (model FLOPs utilisation).

Terms (per token of a causal decoder, Llama/Qwen style, SwiGLU, GQA): a matmul parameter costs 2 FLOPs forward
and 4 backward. Matmul parameters are the q/k/v/o projections, the three SwiGLU matrices of every layer and the
output projection (counted even when tied to the embedding: the logits are a matmul; the embedding lookup is
not). Attention scores QK^T and the weighted sum AV cost 2 x q_dim FLOPs each per (token, context position); a
causal token of a sequence of S tokens sees S / 2 positions on average. So, per token:

    forward  = 2 x matmul_params + 2 x layers x q_dim x S          (log-prob pass)
    training = 3 x forward = 6 x matmul_params + 6 x layers x q_dim x S

Activation recomputation adds hardware FLOPs but no model FLOPs, so it lowers MFU instead of raising the count.
"""

from __future__ import annotations

from fapo_megatron.models.spec import ModelSpec


def matmul_params(shape: ModelSpec) -> int:
    """Parameters that take part in a matmul per token (no norms, biases or embedding lookup)."""
    attention = shape.hidden_size * (shape.q_dim + 2 * shape.kv_dim) + shape.q_dim * shape.hidden_size
    per_layer = attention + 3 * shape.hidden_size * shape.ffn_hidden_size
    return shape.num_layers * per_layer + shape.vocab_size * shape.hidden_size


def forward_flops_per_token(shape: ModelSpec, seq_len: float) -> float:
    """Forward FLOPs of one token in a sequence of `seq_len` tokens (causal attention: half the positions)."""
    return 2.0 * matmul_params(shape) + 2.0 * shape.num_layers * shape.q_dim * seq_len


def train_flops_per_token(shape: ModelSpec, seq_len: float) -> float:
    """Forward + backward (backward = 2 x forward)."""
    return 3.0 * forward_flops_per_token(shape, seq_len)


def mfu(flops: float, seconds: float, num_devices: int, peak_tflops: float) -> float:
    """Achieved model FLOP/s over the devices' combined peak; 0 when no time was spent."""
    if seconds <= 0:
        return 0.0
    return flops / seconds / (num_devices * peak_tflops * 1e12)
