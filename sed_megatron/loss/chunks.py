"""Token chunks: how the passes over a `[t, V/tp]` shard bound their temporaries and stay in cache.

Every pass over a shard walks it in chunks of whole tokens (rows), so its temporaries never
exceed one chunk whatever the caller's layout (with `[b, s, V/tp]` and b = 1 the token dim is
long, a leading dim may not be), and on the CPU a chunk's successive passes run in the caches.
"""

CHUNK_ELEMENTS = 1 << 20
"""Element budget of one chunk on the CPU (4 MiB in fp32: a chunk's passes stay in the caches,
and its temporaries are reused); read at each call, so tests may lower it."""
CHUNK_ELEMENTS_GPU = 1 << 28
"""The same on a GPU, where every pass is one kernel launch and memory-bound either way: whole
shards up to 1 GiB of fp32 (a 2048 x 76032 shard is one chunk)."""


def token_chunks(num_tokens, row_elements, device=None):
    """Row slices that cover [0, num_tokens), each of at most the device's element budget // row_elements rows (>= 1)."""
    budget = CHUNK_ELEMENTS_GPU if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    rows = max(1, budget // max(1, row_elements))
    return [slice(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


FUSED_CHUNK_ELEMENTS = 1 << 24
"""Default logits elements of one chunk of the fused output-layer loss on the CPU (64 MiB in
fp32; 220 tokens of a 76032-id shard, enough for the GEMMs to run at full speed there)."""
FUSED_CHUNK_ELEMENTS_GPU = {False: 1 << 26, True: 1 << 27}
"""The same on a GPU, by scheme (grad_in_forward): a GEMM needs ~1000 rows to stop being bound by
reading the weight, and the three-GEMM scheme reads and writes the fp32 weight gradient once per
chunk, so it takes larger chunks (1765 tokens of a 76032-id shard: 256 MiB of bf16 logits, 2 %
of what the materialized path holds at 32k tokens). Not yet measured on a GPU."""


def fused_chunk_tokens(shard_size, device, grad_in_forward=True):
    """Default chunk of the fused output-layer loss, in tokens: an element budget per device type and scheme."""
    budget = FUSED_CHUNK_ELEMENTS_GPU[bool(grad_in_forward)] if device.type == "cuda" else FUSED_CHUNK_ELEMENTS
    return max(1, budget // max(1, shard_size))
