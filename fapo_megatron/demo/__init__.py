"""The CPU demo: a tiny arithmetic-chain policy warmed up, then trained with FAPO (and GRPO beside it)."""
