"""Triton kernels of the fused output-layer loss: two passes over one chunk of logits `[c, V/tp]`.

    TRITON_INTERPRET=1 python -m pytest tests/loss/test_fused_linear.py -k triton   # on the CPU

1. `local_shard_stats`: one read of every logit of the chunk gives, per token, this shard's
   max m_l, sum_j exp(z_j - m_l) (online: the running sum is rescaled whenever the max
   grows), sum_j exp(z_j - m_l) (z_j - m_l) (the entropy's, when asked for), the tempered sums
   sum_j exp((z_j - m_l) / T) and sum_j exp((z_j - m_l) / T) (z_j - m_l) (a softmax form with
   T != 1: GEM with h = linear), the k largest logits (candidates of the global top-k) and the
   target's logit. The caller all-gathers the candidates and the target logit, takes the global
   max m, rescales the sums to it (`math.rescale_partial_sums`) and all-reduces them, exactly as
   the PyTorch path does.
2. `write_gradient_`: a second read of the chunk writes coef * (softmax(z / T) - onehot(y)) in
   place, in the logits' dtype (no fp32 buffer of the chunk), ready for the two GEMMs of the
   backward.

They cover the softmax-form kinds (`LossKind.temperature` not None: ce, dft, sed, and gem with
h = linear; `supports(kind, cfg)`); GEM with h = logsigmoid keeps the PyTorch chunk math (its
sums need the target's logit on every rank before they can be taken: per-chunk collectives, and
its weights a second transcendental per logit).

Every constexpr combination a launch can take is compiled ahead of time for sm_80 and sm_90 by
tests/loss/test_triton_compile.py (`launch_variants`), so a kernel that Triton cannot compile for
a real GPU fails here, not on the first GPU run.

Importing this module never imports Triton and never fails: `HAVE_TRITON` only says whether it
is installed; Triton is imported and the kernels defined on first use (`_kernels()`). Triton
reads TRITON_INTERPRET=1 (its interpreter, which runs the kernels on CPU tensors) when it is
first imported, so set it before the process imports Triton (the tests set it in the
processes they spawn).
"""

import functools
import importlib.util
import os

import torch

from .math import LocalStats

HAVE_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is installed (the kernels may still need a GPU or the interpreter: `available`)."""
triton = tl = None  # imported by _kernels()

BLOCK_COLUMNS = 2048
"""Columns one program reads per step (a power of two); read at each call, so tests may lower it."""


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device):
    """Whether the kernels can run on tensors of `device`: a GPU with Triton, or Triton's interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def supports(kind, cfg):
    """The kernels compute the softmax gradient forms and their sums (`LossKind.temperature`)."""
    return kind.temperature(cfg) is not None


@functools.lru_cache(maxsize=None)
def _kernels():
    """Import Triton and define the kernels (compiled at their first launch); module globals, as Triton wants."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def local_stats_kernel(logits_ptr, row_stride, real, index_ptr, in_shard_ptr, inv_temperature,
                           max_ptr, sum_ptr, dot_ptr, tempered_sum_ptr, tempered_dot_ptr, topk_ptr, target_ptr,
                           COUNT: tl.constexpr, COUNT_POW2: tl.constexpr, BLOCK: tl.constexpr,
                           WITH_ENTROPY: tl.constexpr, TEMPERED: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        index = tl.load(index_ptr + row)
        columns = tl.arange(0, BLOCK)
        slots = tl.arange(0, COUNT_POW2)
        running_max = float("-inf")
        sum_exp = 0.0
        sum_exp_x = 0.0
        tempered_sum = 0.0
        tempered_dot = 0.0
        target_logit = 0.0
        best = tl.full([COUNT_POW2], float("-inf"), tl.float32)  # the k largest so far, descending
        for start in range(0, real, BLOCK):
            column = start + columns
            inside = column < real  # padding ids (>= vocab_size) are not read: no probability
            values = tl.load(row_ptr + column, mask=inside, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(values, axis=0))
            # Every step reads at least one real logit, so new_max is finite; the first step's
            # old max is -inf, where the shift is 0 (its sums are still 0).
            shift = tl.where(running_max == float("-inf"), 0.0, running_max - new_max)
            rescale = tl.exp(shift)
            shifted = tl.where(inside, values - new_max, 0.0)
            exp_shifted = tl.where(inside, tl.exp(shifted), 0.0)
            if WITH_ENTROPY:
                # sum e^(z - m') (z - m') = e^d (sum e^(z - m) (z - m) + d sum e^(z - m)), d = m - m'
                sum_exp_x = rescale * (sum_exp_x + shift * sum_exp) + tl.sum(exp_shifted * shifted, axis=0)
            if TEMPERED:
                # the same with a = e^((z - m) / T): rescaled by e^(d / T)
                tempered_rescale = tl.exp(shift * inv_temperature)
                tempered = tl.where(inside, tl.exp(shifted * inv_temperature), 0.0)
                tempered_dot = tempered_rescale * (tempered_dot + shift * tempered_sum) + tl.sum(tempered * shifted,
                                                                                                 axis=0)
                tempered_sum = tempered_rescale * tempered_sum + tl.sum(tempered, axis=0)
            sum_exp = rescale * sum_exp + tl.sum(exp_shifted, axis=0)
            running_max = new_max
            target_logit += tl.sum(tl.where(column == index, values, 0.0), axis=0)
            # Merge this step's values into the k best: k times, take the larger head and drop
            # that one element (ties are kept: equal values count once each, as in torch.topk).
            merged = tl.full([COUNT_POW2], float("-inf"), tl.float32)
            for slot in tl.static_range(COUNT):
                best_head = tl.max(best, axis=0)
                values_head = tl.max(values, axis=0)
                from_best = best_head >= values_head
                merged = tl.where(slots == slot, tl.where(from_best, best_head, values_head), merged)
                best = tl.where(slots == tl.argmax(best, axis=0), tl.where(from_best, float("-inf"), best), best)
                values = tl.where(columns == tl.argmax(values, axis=0),
                                  tl.where(from_best, values, float("-inf")), values)
            best = merged
        in_shard = tl.load(in_shard_ptr + row) != 0
        tl.store(max_ptr + row, running_max)
        tl.store(sum_ptr + row, sum_exp)
        if WITH_ENTROPY:
            tl.store(dot_ptr + row, sum_exp_x)
        if TEMPERED:
            tl.store(tempered_sum_ptr + row, tempered_sum)
            tl.store(tempered_dot_ptr + row, tempered_dot)
        tl.store(topk_ptr + row * COUNT + slots, best, mask=slots < COUNT)
        tl.store(target_ptr + row, tl.where(in_shard, target_logit, 0.0))

    @triton.jit
    def gradient_kernel(logits_ptr, row_stride, real, num_columns, inv_temperature, max_ptr, scale_ptr,
                        target_coef_ptr, index_ptr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = tl.program_id(1) * BLOCK
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        column = start + tl.arange(0, BLOCK)
        present = column < num_columns
        values = tl.load(row_ptr + column, mask=present, other=0.0).to(tl.float32)
        logits_max = tl.load(max_ptr + row)
        scale = tl.load(scale_ptr + row)
        target_coef = tl.load(target_coef_ptr + row)
        index = tl.load(index_ptr + row)
        grad = tl.where(column < real, tl.exp((values - logits_max) * inv_temperature) * scale, 0.0)
        grad = tl.where(column == index, grad - target_coef, grad)
        tl.store(row_ptr + column, grad.to(logits_ptr.dtype.element_ty), mask=present)

    return local_stats_kernel, gradient_kernel


def _block(num_columns):
    """Columns per step (a power of two, 16 to BLOCK_COLUMNS): a constexpr of both kernels."""
    return max(16, min(BLOCK_COLUMNS, _next_power_of_2(max(1, num_columns))))


def launch_variants(count, with_entropy, tempered):
    """The constexpr values of local_stats_kernel for one call (BLOCK aside)."""
    return dict(COUNT=count, COUNT_POW2=_next_power_of_2(count), WITH_ENTROPY=with_entropy, TEMPERED=tempered)


_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
BLOCKS = tuple(1 << n for n in range(4, 12))
"""Every BLOCK `_block` can give (16 to BLOCK_COLUMNS = 2048)."""
COUNTS = (1, 2, 3, 10)
"""Values of COUNT = min(k, V/tp) the compile test covers: k = 1 (amax), the paper's 2, an odd k,
and the published calibration's 10 (COUNT_POW2 above COUNT)."""


def compile_variants():
    """(kernel name, signature, constexprs) for each launch the code can make, for an ahead-of-time
    compile (tests/loss/test_triton_compile.py): every logits dtype x entropy x tempered flag with
    the COUNT and BLOCK values in rotation, every BLOCK of both kernels at least once per dtype.
    Integer arguments as Triton types them at a launch (i32; the row stride i64 at worst)."""
    stats_kernel, gradient_kernel = _kernels()
    per_token = {name: "*fp32" for name in ("max_ptr", "sum_ptr", "dot_ptr", "tempered_sum_ptr", "tempered_dot_ptr",
                                             "topk_ptr", "target_ptr")}
    variants = []
    flags = [(entropy, tempered) for entropy in (False, True) for tempered in (False, True)]
    for d, dtype in enumerate(_POINTER):
        for f, (entropy, tempered) in enumerate(flags):
            step = d * len(flags) + f
            signature = {"logits_ptr": _POINTER[dtype], "row_stride": "i64", "real": "i32", "index_ptr": "*i64",
                         "in_shard_ptr": "*i8", "inv_temperature": "fp32", **per_token}
            constexprs = dict(launch_variants(COUNTS[step % len(COUNTS)], entropy, tempered),
                              BLOCK=BLOCKS[(3 * step) % len(BLOCKS)])
            variants.append(("local_stats_kernel", stats_kernel, signature, constexprs))
        for block in BLOCKS:
            signature = {"logits_ptr": _POINTER[dtype], "row_stride": "i64", "real": "i32", "num_columns": "i32",
                         "inv_temperature": "fp32", "max_ptr": "*fp32", "scale_ptr": "*fp32",
                         "target_coef_ptr": "*fp32", "index_ptr": "*i64"}
            variants.append(("gradient_kernel", gradient_kernel, signature, {"BLOCK": block}))
    return [(name, kernel, {**signature, **{key: "constexpr" for key in constexprs}}, constexprs)
            for name, kernel, signature, constexprs in variants]


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def local_shard_stats(logits, index, in_shard, real, count, with_entropy, temperature=1.0):
    """One pass over this shard's logits `[c, V/tp]` (rows contiguous, any float dtype) -> LocalStats.

    index `[c]` int64 and in_shard `[c]` bool locate the target (`math.shard_target_index`);
    real: the columns that are tokens (the rest is padding); count = min(k, V/tp) candidates;
    temperature: T of the kind's softmax form (the tempered sums when T != 1). With no real
    column m_l is -inf and every sum is 0.
    """
    local_stats_kernel, _ = _kernels()
    rows = logits.size(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    tempered = temperature != 1.0

    def per_token(wanted=True):
        return torch.empty(rows, dtype=torch.float32, device=device) if wanted else None

    local_max, sum_exp, target_logit = per_token(), per_token(), per_token()
    sum_exp_x = per_token(with_entropy)
    tempered_sum, tempered_dot = per_token(tempered), per_token(tempered)
    candidates = torch.empty(rows, count, dtype=torch.float32, device=device)
    if rows:
        local_stats_kernel[(rows,)](
            logits, logits.stride(0), real, index.contiguous(), in_shard.to(torch.int8), 1.0 / temperature,
            local_max, sum_exp, sum_exp if sum_exp_x is None else sum_exp_x,
            sum_exp if tempered_sum is None else tempered_sum, sum_exp if tempered_dot is None else tempered_dot,
            candidates, target_logit, BLOCK=_block(real), **launch_variants(count, with_entropy, tempered),
        )
    return LocalStats(local_max, sum_exp, sum_exp_x, (tempered_sum, tempered_dot) if tempered else None, candidates,
                      target_logit)


def write_gradient_(logits, logits_max, scale, target_coef, index, real, temperature=1.0):
    """In place: logits `[c, V/tp]` -> scale * exp((z - m) / T) - target_coef * onehot(y), 0 at padding ids.

    logits_max `[c]` is the global max m; scale = coef / normalizer (sum_j exp(z_j - m), or the
    tempered sum for T != 1) and target_coef = coef where the target lies in this shard (else 0),
    all fp32 `[c]`. The result keeps the logits' dtype. Returns logits.
    """
    _, gradient_kernel = _kernels()
    rows, num_columns = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("write_gradient_: the logits' rows must be contiguous")
    if rows:
        block = _block(num_columns)
        gradient_kernel[(rows, triton.cdiv(num_columns, block))](
            logits, logits.stride(0), real, num_columns, 1.0 / temperature, logits_max.contiguous(),
            scale.contiguous(), target_coef.contiguous(), index.contiguous(), BLOCK=block,
        )
    return logits
