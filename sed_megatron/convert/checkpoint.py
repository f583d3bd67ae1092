"""What both converters read and write: safetensors shards, staged output, a one-process world.

The model file beside a checkpoint (its architecture) is sed_megatron/models/model_file.py's.
"""

import contextlib
import json
import os
import shutil
import struct

from sed_megatron.utils import UsageError

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def read_safetensors_header(path):
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, checked."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise UsageError("header longer than the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise UsageError(f"{path}: shard listed in the index is missing") from None
    except (OSError, struct.error, ValueError) as err:
        raise UsageError(f"{path}: cannot read the shard (not a safetensors file: {err})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise UsageError(f"{path}: {name} has an unsupported dtype {entry.get('dtype')!r}")
        if data_start + entry["data_offsets"][1] > size:
            raise UsageError(f"{path}: the file is truncated ({name} lies past its end)")
    return data_start, header


class HFTensors:
    """Tensors of a Hugging Face directory, read one at a time from (sharded) safetensors.

    Every shard's header is read and checked up front (missing shard, corrupt or truncated
    file, a tensor the index places in a shard that lacks it). A tensor is then read with one
    positioned read into its own buffer: no memory map, so the process holds only the tensors
    in use, whatever the size of the checkpoint.
    """

    def __init__(self, hf_dir):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                where = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            where = None
        else:
            raise UsageError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._entries = {}  # name -> (path, offset of the data, header entry)
        for shard in sorted(set(where.values())) if where else ["model.safetensors"]:
            path = os.path.join(hf_dir, shard)
            data_start, header = read_safetensors_header(path)
            for name, entry in header.items():
                if where is None or where.get(name) == shard:
                    self._entries[name] = (path, data_start, entry)
        for name, shard in (where or {}).items():
            if name not in self._entries:
                raise UsageError(f"{os.path.join(hf_dir, shard)}: the index places {name} here, but the shard lacks it")

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def _entry(self, name):
        if name not in self._entries:
            raise UsageError(f"{self.hf_dir}: tensor {name} is missing from the checkpoint")
        return self._entries[name]

    def meta(self, name):
        """A meta tensor with the dtype and shape of `name` (nothing is read)."""
        import torch

        _, _, entry = self._entry(name)
        return torch.empty(entry["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]]), device="meta")

    def __call__(self, name):
        import torch

        path, data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise UsageError(f"{path}: cannot read {name} (the file is truncated)")
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class ShardWriter:
    """safetensors shards of at most max_bytes (unless one tensor is larger), written as they fill,
    then named as transformers expects (model.safetensors, or model-0000i-of-0000n with an index)."""

    def __init__(self, directory, max_bytes):
        self.directory, self.max_bytes = directory, max_bytes
        self.files, self.total = [], 0
        self._pending, self._size = {}, 0

    def add(self, name, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._size + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._size += nbytes
        self.total += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        file_name = f"part-{len(self.files):05d}.safetensors"
        path = os.path.join(self.directory, file_name)
        save_file(self._pending, path, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600: as readable as the files beside it
        self.files.append((file_name, list(self._pending)))
        self._pending, self._size = {}, 0

    def close(self):
        """Name the shards and write the index; the number of tensors."""
        if self._pending or not self.files:
            self._flush()
        count = len(self.files)
        weight_map = {}
        for i, (file_name, names) in enumerate(self.files):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, file_name), os.path.join(self.directory, final))
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return len(weight_map)


def check_output_dir(path, overwrite):
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"{path}: output directory is not empty (use --overwrite)")


@contextlib.contextmanager
def staged_output(final_dir):
    """A temporary directory beside final_dir. It replaces final_dir (as --overwrite allowed)
    when the block completes, and is removed if anything fails: never a half-written output."""
    tmp_dir = f"{os.path.abspath(final_dir.rstrip('/'))}.tmp-{os.getpid()}"
    try:
        yield tmp_dir
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
