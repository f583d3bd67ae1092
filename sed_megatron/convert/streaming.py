"""Megatron torch_dist checkpoints written and read one tensor (one layer) at a time.

Import: the model is built on the meta device and handed to Megatron-LM's own save_checkpoint
with a save strategy whose planner produces every tensor only when the writer asks for it
(`materialize(key, offset)`), so the checkpoint has exactly Megatron's layout (keys, per-layer
chunks, common.pt, metadata.json) while the process holds one tensor at a time. PyTorch's
FileSystemWriter keeps every tensor of a file until the file is closed, so each tensor gets
its own file.

Export: one group of parameters at a time (the global tensors, then each decoder layer), each
parameter read as its region of the stored tensor with PyTorch's checkpoint reader, into
buffers of that group only (Megatron's own load insists on covering whole stacked tensors).
"""

import functools
import re

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def chunk_sources(sharded_state_dict):
    """{(checkpoint key, global offset): (state-dict name, cut)}: cut(whole tensor) is that chunk.

    A parameter is one chunk, or several where Megatron saves it through a factory (the fused
    SwiGLU fc1 is stored as its gate and up halves, so that any TP can load it)."""
    sources = {}
    for name, sh in sharded_state_dict.items():
        if isinstance(sh, ShardedTensor):
            sources[(sh.key, tuple(sh.global_offset))] = (name, lambda tensor: tensor)
        elif isinstance(sh, ShardedTensorFactory):
            for i, chunk in enumerate(nested_values(sh.build())):
                sources[(chunk.key, tuple(chunk.global_offset))] = (name, functools.partial(_factory_chunk, sh, i))
    return sources


def _factory_chunk(factory, index, tensor):
    built = factory.build_fn(factory.key, tensor, factory.replica_id, factory.flattened_range)
    return list(nested_values(built))[index].data


class _MaterializingPlanner(MCoreSavePlanner):
    """Resolves a meta placeholder into its tensor when the writer reaches it."""

    def __init__(self, materialize, **kwargs):
        super().__init__(**kwargs)
        self._materialize = materialize

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if isinstance(data, torch.Tensor) and data.is_meta:
            value = self._materialize(write_item.index.fqn, tuple(write_item.index.offset))
            if value.numel() != data.numel() or value.dtype != data.dtype:
                raise ValueError(f"{write_item.index.fqn}: produced {tuple(value.shape)} {value.dtype}, "
                                 f"the checkpoint expects {tuple(data.shape)} {data.dtype}")
            data = value.reshape(data.shape)
        return data


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save of a meta model: materialize(key, offset) gives each chunk's tensor."""

    def __init__(self, materialize):
        super().__init__()
        self._materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                             self.keep_only_main_replica)
        dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False),
                 planner=_MaterializingPlanner(self._materialize, flatten_state_dict=False,
                                               flatten_sharded_tensors=False))


def layer_groups(sharded_state_dict):
    """The model's ShardedTensors grouped: the global ones first, then one group per decoder layer."""
    groups = {}
    for name, sh in sharded_state_dict.items():
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            match = _LAYER.match(name)
            groups.setdefault(int(match.group(1)) if match else -1, {})[name] = sh
    return [groups[k] for k in sorted(groups)]


def _region(sh):
    """(checkpoint key, global offset, shape) that one TP=1 parameter covers in the checkpoint."""
    chunks = list(nested_values(sh.build())) if isinstance(sh, ShardedTensorFactory) else [sh]
    offset = tuple(min(c.global_offset[axis] for c in chunks) for axis in range(len(chunks[0].global_offset)))
    shape = (1,) * chunks[0].prepend_axis_num + tuple(sh.data.shape)
    if sum(c.data.numel() for c in chunks) != sh.data.numel():
        raise ValueError(f"{sh.key}: the parameter does not cover one region of the checkpoint")
    return sh.key, offset, shape


class _RegionLoadPlanner(dcp.DefaultLoadPlanner):
    """Reads state_dict[key] from the region of the stored key that starts at offsets[key]."""

    def __init__(self, offsets):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._offsets = offsets

    def create_local_plan(self):
        items = []
        for key, tensor in self.state_dict.items():
            if key not in self.metadata.state_dict_metadata:
                raise ValueError(f"the checkpoint has no tensor {key}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets[key]), sizes=tensor.size())
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]  # the whole buffer; read items place themselves by their dest_offsets


def load_group(group, checkpoint_dir, dtype):
    """{state-dict name: tensor} of one group, read from a torch_dist checkpoint directory.

    Each TP=1 parameter is a region of a stored key (one layer of a stacked key, both halves of a
    SwiGLU fc1, one expert of a layer's experts), read directly whatever TP x PP x EP wrote the
    chunks. Parameters that are regions of the same key (a layer's experts share one) are read
    together, as the box that holds them all."""
    regions = {name: _region(sh) for name, sh in group.items()}
    boxes = {}  # key -> (lowest offset, highest end) over its parameters
    for key, offset, shape in regions.values():
        end = tuple(o + n for o, n in zip(offset, shape))
        if key in boxes:
            low, high = boxes[key]
            offset, end = tuple(map(min, low, offset)), tuple(map(max, high, end))
        boxes[key] = (offset, end)
    request = {key: torch.empty([h - l for l, h in zip(low, high)], dtype=dtype) for key, (low, high) in boxes.items()}
    dcp.load(request, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)),
             planner=_RegionLoadPlanner({key: low for key, (low, _) in boxes.items()}))
    tensors = {}
    for name, (key, offset, shape) in regions.items():
        low = boxes[key][0]
        part = request[key][tuple(slice(o - l, o - l + n) for o, l, n in zip(offset, low, shape))]
        tensors[name] = part.reshape(group[name].data.shape)
    return tensors
