"""Generation backends behind one protocol (fapo_megatron/engine_protocol.py): SGLang for GPU clusters, embedded
HF for anywhere."""
