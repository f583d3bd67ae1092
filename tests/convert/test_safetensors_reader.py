"""HFTensors reads safetensors without a memory map: the same tensors as safetensors, clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sed_megatron.convert.checkpoint import HFTensors


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.float32": torch.randn(3, 5, generator=gen),
        "b.bfloat16": torch.randn(7, 2, generator=gen).to(torch.bfloat16),
        "c.float16": torch.randn(4, generator=gen).to(torch.float16),
        "d.int64": torch.arange(-3, 9).reshape(3, 4),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(2.5),
    }


def test_reads_what_safetensors_wrote_single_and_sharded(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({n: tensors[n] for n in names[:3]}, sharded / "model-1.safetensors")
    save_file({n: tensors[n] for n in names[3:]}, sharded / "model-2.safetensors")
    with open(sharded / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {n: f"model-{1 if i < 3 else 2}.safetensors" for i, n in enumerate(names)}}, f)
    for directory in (tmp_path, sharded):
        hf = HFTensors(str(directory))
        assert sorted(hf) == names
        for name, expected in tensors.items():
            got = hf(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name
            meta = hf.meta(name)
            assert meta.is_meta and meta.shape == expected.shape and meta.dtype == expected.dtype
    reference = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(HFTensors(str(tmp_path))(n), reference[n]) for n in reference)


def test_errors_name_the_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)  # the last tensor's bytes are cut short
    with pytest.raises(ValueError, match=r"model\.safetensors: the file is truncated"):
        HFTensors(str(tmp_path))

    save_file(tensors, path)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a.float32": "model.safetensors", "z.absent": "model.safetensors"}}, f)
    with pytest.raises(ValueError, match=r"model\.safetensors: the index places z\.absent here, but the shard lacks it"):
        HFTensors(str(tmp_path))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a.float32": "model.safetensors"}}, f)
    with pytest.raises(ValueError, match="tensor b.bfloat16 is missing from the checkpoint"):
        HFTensors(str(tmp_path))("b.bfloat16")
