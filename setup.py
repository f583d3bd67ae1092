from setuptools import find_packages, setup

# examples/rl/grpo_trl.py and the parquet of examples/rl/prepare_data.py. TRL >= 1.15 ends a
# completion at every eos id of generation_config.json (an instruct model's end of turn), not
# only at the tokenizer's eos.
RL_REQUIRES = ["trl>=1.15", "pyarrow"]
# tools/gguf_to_hf.py: transformers reads GGUF files only with these two installed.
GGUF_REQUIRES = ["gguf>=0.10", "accelerate"]
# tests/lora: the exported adapter is loaded with PEFT, as users load it.
LORA_REQUIRES = ["peft>=0.15"]
DATA_REQUIRES = ["datasets>=3", "pyarrow>=15"]  # saved datasets (save_to_disk) and parquet input

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
    entry_points={
        "console_scripts": [
            "sed-sft = sed_megatron.train:main",  # the one command: HF model + data -> trained HF model
            "sed-train = sed_megatron.train:main",
            "sed-preprocess-sft-data = sed_megatron.cli.preprocess_sft_data:main",
            "sed-calibrate-tau = sed_megatron.cli.calibrate_tau:main",
            "sed-convert-hf-to-mcore = sed_megatron.cli.convert_hf_to_mcore:main",
            "sed-convert-mcore-to-hf = sed_megatron.cli.convert_mcore_to_hf:main",
            "sed-compare-hf-mcore = sed_megatron.cli.compare_hf_mcore:main",
            "sed-gguf-to-hf = sed_megatron.cli.gguf_to_hf:main",
            "sed-eval-diversity = sed_megatron.cli.eval_diversity:main",
            "sed-plot-metrics = sed_megatron.cli.plot_metrics:main",
        ],
    },
    extras_require={
        # Transformer Engine: fused layers and parallel CE on GPUs. apex has no usable PyPI
        # package; it is used when importable.
        "gpu": ["transformer-engine[pytorch]"],
        "rl": RL_REQUIRES,
        "gguf": GGUF_REQUIRES,
        # tests/examples/test_rl.py runs 2 GRPO steps with TRL; tests/convert/test_gguf_to_hf.py writes GGUF files;
        # tools/gpu_check.sh gives each GPU test a timeout (pytest-timeout)
        "lora": LORA_REQUIRES,
        "data": DATA_REQUIRES,
        "test": ["pytest", "pytest-timeout", *RL_REQUIRES, *GGUF_REQUIRES, *LORA_REQUIRES, *DATA_REQUIRES],
    },
)
