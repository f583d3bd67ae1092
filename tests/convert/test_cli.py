"""The command lines of the contract: tools/*.py shims over sed_megatron.cli, console scripts,
`prog: error: ...` and exit 2 on bad input (--help of every tool: tests/test_tools_help.py)."""

import os
import re

import pytest

from .common import convert, export, save_hf, tensors


def test_tools_convert_both_ways(tmp_path):
    """python tools/convert_hf_to_mcore.py, then tools/convert_mcore_to_hf.py: the same weights back."""
    hf_dir = save_hf(tmp_path / "hf", "llama_gqa_untied")
    out = convert(hf_dir, tmp_path / "ckpt")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"saved {tmp_path / 'ckpt'} (llama, float32, padded vocab 1024)"
    out = export(tmp_path / "ckpt", tmp_path / "out", "--hf-template", hf_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"saved {tmp_path / 'out'} (llama, float32, 21 tensors)"
    original, exported = tensors(hf_dir), tensors(tmp_path / "out")
    assert original.keys() == exported.keys() and all((original[n] == exported[n]).all() for n in original)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    out = convert(tmp_path / "absent", tmp_path / "a")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"convert_hf_to_mcore.py: error: {tmp_path / 'absent'}: no config.json"
    out = export(tmp_path, tmp_path / "b")
    assert out.returncode == 2
    assert re.fullmatch(r"convert_mcore_to_hf\.py: error: .*: no sed_megatron_model\.yaml .*",
                        out.stderr.strip().splitlines()[-1])
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_compare_wants_as_many_processes_as_the_layout(tmp_path, capsys, monkeypatch):
    """Under torchrun with too few processes (without torchrun the tool starts its own)."""
    from sed_megatron.cli import compare_hf_mcore
    from sed_megatron.models.model_file import MODEL_FILE

    from ..models.test_config import EARLIER_MODEL_FILE

    (tmp_path / MODEL_FILE).write_text(EARLIER_MODEL_FILE)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="2"):
        compare_hf_mcore.main(["--hf-dir", str(tmp_path), "--load", str(tmp_path), "--tp", "2", "--pp", "2"])
    assert capsys.readouterr().err.strip() == ("compare_hf_mcore.py: error: --tp 2 --pp 2 needs 4 processes "
                                               "(torchrun --nproc_per_node 4), got 1")
    with pytest.raises(SystemExit, match="2"):
        compare_hf_mcore.main(["--hf-dir", str(tmp_path), "--load", str(tmp_path), "--ep", "2"])
    assert "describes a dense model (no num_experts)" in capsys.readouterr().err
