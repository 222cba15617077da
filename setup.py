from setuptools import find_packages, setup

CPU = [
    "torch==2.13.0",  # the CPU wheel; a GPU cluster brings its own CUDA build
    "megatron-core>=0.16.1,<0.20",
    "psutil",  # imported by megatron-core without being declared
    "ray>=2.40",
    "transformers>=4.57",
    "safetensors",
    "tensorboard",
    "math-verify",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "gguf",  # SmolLM2 GGUF -> HF export (convert smollm2)
    "accelerate",
]
GPU = [
    "transformer-engine[pytorch]",
    "sglang>=0.5.3,<0.6",
    "flash-attn",
]
TEST = ["pytest", "pytest-xdist", "pytest-timeout", "ruff"]

setup(
    name="fapo_megatron",
    version="0.1.0",
    description="Megatron-based RL training backend for FAPO (Flawed-Aware Policy Optimization)",
    python_requires=">=3.11",
    packages=find_packages(include=["fapo_megatron", "fapo_megatron.*"]),
    package_data={"fapo_megatron": ["data/*", "data/**/*"]},
    install_requires=["pyyaml", "numpy", "requests", "psutil"],
    extras_require={"cpu": CPU, "gpu": GPU, "test": TEST},
    entry_points={"console_scripts": ["fapo-megatron=fapo_megatron.cli:main"]},
)
