"""What the converter tests share: tiny checkpoints, the converters in a fresh process, compare under torchrun,
and batches of conversions and comparisons in one set of processes."""

import os

from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from sed_megatron.testing.tiny_hf import tiny_hf_model

from ..training.launch import REPO, _env

TOOLS = os.path.join(REPO, "tools")


def save_hf(directory, variant, shard="50KB"):
    """A tiny random model of the variant saved in several safetensors shards."""
    tiny_hf_model(variant).save_pretrained(directory, max_shard_size=shard)
    return str(directory)


def to_mcore(hf_dir, save, **kwargs):
    """convert_hf_to_mcore in a fresh process (it initializes Megatron's global state), forked from one
    that has imported it (tests/warm.py: the seconds of a spawned process's imports saved); returns Converted."""
    from tests import warm

    return warm.call(convert_hf_to_mcore, str(hf_dir), str(save), progress=False, env=_env(), cwd=REPO, **kwargs)


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
    from tests import warm

    return warm.capture(os.path.join(TOOLS, f"{name}.py"), flags, env=_env(), cwd=REPO, timeout=300)


def convert(hf_dir, save, *flags):
    """python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR [flags]."""
    return tool("convert_hf_to_mcore", "--hf-dir", hf_dir, "--save", save, *flags)


def export(ckpt, save, *flags):
    """python tools/convert_mcore_to_hf.py --load CKPT_DIR --save HF_DIR [flags]."""
    return tool("convert_mcore_to_hf", "--load", ckpt, "--save", save, *flags)


def compare(hf_dir, ckpt, tp=1, pp=1, ep=1):
    """max_abs_logit_diff of `torchrun tools/compare_hf_mcore.py` (the contract command), which must exit 0."""
    from tests import warm

    layout = ["--tp", str(tp)] + (["--pp", str(pp)] if pp > 1 else []) + (["--ep", str(ep)] if ep > 1 else [])
    out = warm.capture(os.path.join(TOOLS, "compare_hf_mcore.py"), ["--hf-dir", hf_dir, "--load", ckpt, *layout],
                       env=_env(), cwd=REPO, nproc=tp * pp * ep, timeout=300)  # as torchrun starts them
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=")
    return float(last.split("=")[1])


def convert_job(hf_dir, save, **kwargs):
    """A batch job: convert_hf_to_mcore(hf_dir, save, **kwargs) on one process; its result is the
    Converted, or the ValueError it raised (the tests of bad input assert on it)."""
    return ("convert", str(hf_dir), str(save), kwargs)


def export_job(ckpt, save, **kwargs):
    """A batch job: convert_mcore_to_hf(ckpt, save, **kwargs) on one process (so that a later job
    of the batch can import what it wrote); its result is the Converted."""
    return ("export", str(ckpt), str(save), kwargs)


def compare_job(hf_dir, ckpt, tp=1, pp=1, ep=1):
    """A batch job: compare_hf_mcore at TP x PP x EP on that many processes; its result is the
    Comparison (max_abs_logit_diff, ok, ...)."""
    return ("compare", str(hf_dir), str(ckpt), {"tp": tp, "pp": pp, "ep": ep})


def _job_size(job):
    kind, _, _, kwargs = job
    return kwargs["tp"] * kwargs["pp"] * kwargs["ep"] if kind == "compare" else 1


def _run_job(kind, source, path, kwargs):
    """One job, in a process of its own (forked: tests/warm.py): its result, or the ValueError of
    a bad conversion (the tests of bad input assert on it)."""
    from sed_megatron.convert.compare import compare_hf_mcore
    from sed_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from sed_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    if kind == "convert":
        try:
            return convert_hf_to_mcore(source, path, progress=False, **kwargs)
        except ValueError as err:  # bad input: one process, no collective left waiting
            return err
    if kind == "export":
        return convert_mcore_to_hf(source, path, progress=False, **kwargs)
    return compare_hf_mcore(source, path, **kwargs)


def run_batch(jobs, tmp_dir):
    """convert_job / export_job / compare_job results, in order: each job on as many ranks as it
    needs, forked from a process that has imported the converters (tests/warm.py), so each
    start-up costs no import. A comparison that raises fails the batch."""
    from tests import warm

    return [warm.call(_run_job, *job, nproc=_job_size(job), env=_env(), cwd=REPO,
                      log=os.path.join(str(tmp_dir), f"job{index}.log")) for index, job in enumerate(jobs)]


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
