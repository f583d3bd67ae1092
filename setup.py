from setuptools import find_packages, setup

# examples/rl/grpo_trl.py and the parquet of examples/rl/prepare_data.py. TRL >= 1.15 ends a
# completion at every eos id of generation_config.json (an instruct model's end of turn), not
# only at the tokenizer's eos.
RL_REQUIRES = ["trl>=1.15", "pyarrow"]

setup(
    name="sed_megatron",
    version="0.1.0",
    description="SED-SFT (Selectively Encouraging Diversity in SFT) and its baselines on Megatron-Core",
    python_requires=">=3.12",
    packages=find_packages(include=["sed_megatron", "sed_megatron.*"]),
    install_requires=[
        "megatron-core>=0.19.2,<0.20",
        "torch",
        "pyyaml",
        "nltk",
        "psutil",  # Megatron's checkpoint writer needs it and does not declare it
        "safetensors",
        "tensorboard",  # Megatron's --tensorboard-dir writer
        "matplotlib",  # tools/plot_metrics.py
        "transformers",
        "numpy",
    ],
    extras_require={
        # Transformer Engine: fused layers and parallel CE on GPUs. apex has no usable PyPI
        # package; it is used when importable.
        "gpu": ["transformer-engine[pytorch]"],
        "rl": RL_REQUIRES,
        "test": ["pytest", *RL_REQUIRES],  # tests/examples/test_rl.py runs 2 GRPO steps with TRL
    },
)
