"""Token chunks: how the passes that need temporaries bound them.

Every pass over a `[t, V/tp]` shard that needs a temporary of the shard's shape (a second
exponential, a product to reduce) walks it in chunks of whole tokens (rows), so its
temporaries never exceed CHUNK_ELEMENTS elements whatever the caller's layout: with
`[b, s, V/tp]` and b = 1 the token dim is long, a leading dim may not be.
"""

CHUNK_ELEMENTS = 1 << 20
"""Element budget of one chunk's temporaries (4 MiB in fp32: a few passes over a chunk stay in the
CPU's caches, and the allocator reuses it); read at each call, so tests may lower it."""


def token_chunks(num_tokens, row_elements):
    """Row slices that cover [0, num_tokens), each of at most CHUNK_ELEMENTS // row_elements rows (>= 1)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, row_elements))
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
