"""fapo-megatron: a Megatron-core RL training backend with FAPO (Flawed-Aware Policy Optimization) built in."""

__version__ = "0.1.0"
