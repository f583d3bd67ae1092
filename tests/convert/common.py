"""What the converter tests share: tiny checkpoints, the converters in a fresh process, compare under torchrun."""

import os
import subprocess
import sys

from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from sed_megatron.launch import run_isolated
from sed_megatron.testing.tiny_hf import tiny_hf_model
from sed_megatron.utils import free_port

from ..training.launch import REPO, _env

TOOLS = os.path.join(REPO, "tools")


def save_hf(directory, variant, shard="50KB"):
    """A tiny random model of the variant saved in several safetensors shards."""
    tiny_hf_model(variant).save_pretrained(directory, max_shard_size=shard)
    return str(directory)


def to_mcore(hf_dir, save, **kwargs):
    """convert_hf_to_mcore in a fresh process (it initializes Megatron's global state); returns Converted."""
    return run_isolated(convert_hf_to_mcore, str(hf_dir), str(save), progress=False, **kwargs)


def to_hf(ckpt, save, **kwargs):
    """convert_mcore_to_hf in this process: it sets up (and tears down) a one-process world of its own."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sed_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    done = convert_mcore_to_hf(str(ckpt), str(save), progress=False, **kwargs)
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()  # nothing left behind
    return done


def tool(name, *flags):
    """`python tools/<name>.py FLAGS` (the contract command line); the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(TOOLS, f"{name}.py"), *map(str, flags)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)


def convert(hf_dir, save, *flags):
    """python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR [flags]."""
    return tool("convert_hf_to_mcore", "--hf-dir", hf_dir, "--save", save, *flags)


def export(ckpt, save, *flags):
    """python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [flags]."""
    return tool("convert_mcore_to_hf", "--load", ckpt, "--save", save, *flags)


def compare(hf_dir, ckpt, tp=1, pp=1):
    """max_abs_logit_diff of `torchrun tools/compare_hf_mcore.py` (the contract command), which must exit 0."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    layout = ["--tp", str(tp)] + (["--pp", str(pp)] if pp > 1 else [])
    out = subprocess.run([torchrun, "--nproc_per_node", str(tp * pp), "--master_port", str(free_port()),
                          os.path.join(TOOLS, "compare_hf_mcore.py"), "--hf-dir", str(hf_dir), "--load", str(ckpt),
                          *layout], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=")
    return float(last.split("=")[1])


def tensors(directory):
    """Every tensor of the safetensors files in a directory."""
    from safetensors.torch import load_file

    result = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            result.update(load_file(os.path.join(directory, name)))
    return result


def training_config(tmp_path):
    """The tiny example without its model section: the architecture comes from --load."""
    import yaml

    from ..training.launch import TINY

    with open(TINY) as f:
        run = yaml.safe_load(f)
    del run["model"]
    run["training"]["seq_length"] = 64
    run["checkpoint"] = {}
    config = str(tmp_path / "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(run, f)
    return config
