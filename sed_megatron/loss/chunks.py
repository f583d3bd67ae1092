"""Token chunks: how the passes that need temporaries bound them.

Every pass over a `[t, V/tp]` shard that needs a temporary of the shard's shape (a second
exponential, a product to reduce) walks it in chunks of whole tokens (rows), so its
temporaries never exceed CHUNK_ELEMENTS elements whatever the caller's layout: with
`[b, s, V/tp]` and b = 1 the token dim is long, a leading dim may not be.
"""

CHUNK_ELEMENTS = 1 << 22
"""Element budget of one chunk's temporaries (16 MiB in fp32); read at each call, so tests may lower it."""


def token_chunks(num_tokens, row_elements):
    """Row slices that cover [0, num_tokens), each of at most CHUNK_ELEMENTS // row_elements rows (>= 1)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [slice(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


FUSED_CHUNK_ELEMENTS = 1 << 24
"""Default logits elements of one chunk of the fused output-layer loss on the CPU (64 MiB in
fp32; 220 tokens of a 76032-id shard, enough for the GEMMs to run at full speed there)."""
FUSED_CHUNK_ELEMENTS_GPU = 1 << 26
"""The same on a GPU, where a GEMM needs ~1000 rows to stop being bound by reading the weight
(882 tokens of a 76032-id shard; 128 MiB of bf16 logits). Not yet measured on a GPU."""


def fused_chunk_tokens(shard_size, device):
    """Default chunk of the fused output-layer loss, in tokens: an element budget per device type."""
    budget = FUSED_CHUNK_ELEMENTS_GPU if device.type == "cuda" else FUSED_CHUNK_ELEMENTS
    return max(1, budget // max(1, shard_size))
