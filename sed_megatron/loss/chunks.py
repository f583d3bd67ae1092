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
