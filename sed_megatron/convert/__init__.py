"""Checkpoints between Hugging Face and Megatron-Core, streaming, for every registered family.

    convert_hf_to_mcore(hf_dir, save)            # hf_to_mcore.py: HF directory -> torch_dist checkpoint
    convert_mcore_to_hf(load, save)              # mcore_to_hf.py: any TP x PP checkpoint -> HF directory
    compare_hf_mcore(hf_dir, load, tp=2)         # compare.py: logits of both, under torchrun

checkpoint.py holds the model file, the safetensors reader and the staged output; streaming.py
writes and reads torch_dist one tensor (one layer) at a time. The name maps and architecture
maps are the families' (sed_megatron/models/).
"""

from .compare import compare_hf_mcore
from .hf_to_mcore import convert_hf_to_mcore
from .mcore_to_hf import convert_mcore_to_hf

__all__ = ["compare_hf_mcore", "convert_hf_to_mcore", "convert_mcore_to_hf"]
