from setuptools import find_packages, setup

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
        # tools/gguf_to_hf.py: transformers reads GGUF files only with these two installed
        "gguf": ["gguf>=0.10", "accelerate"],
        "test": ["pytest", "gguf>=0.10", "accelerate"],  # tests/convert/test_gguf_to_hf.py
    },
    entry_points={
        "console_scripts": ["sed-gguf-to-hf=sed_megatron.cli.gguf_to_hf:main"],
    },
)
