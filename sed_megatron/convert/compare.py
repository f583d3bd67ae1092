"""The same tokens through transformers and through the Megatron checkpoint at TP x PP (x EP).

    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2
    result = compare_hf_mcore(hf_dir, load, tp=2)        # on every rank of a 2-process world

Loads the checkpoint (architecture from its sed_megatron_model.yaml) the way training does
(Megatron's load_checkpoint, resharded to the layout, the training model provider), runs a
seeded batch of random token ids through Megatron's pipeline schedule (forward only), gathers
the last stage's vocab-parallel logits, drops the padding ids and compares with the Hugging
Face model's logits.

It checks the mapping whatever the checkpoint's dtype: by default both models run in fp32 from
the same stored weights (a bf16 checkpoint is upcast on load), where the two differ by
summation order only, so a tolerance of 1e-3 separates a wrong mapping from rounding on any
model. compute_dtype="bfloat16" runs both in bf16 instead (the precision of training): bf16
rounds every activation, and on a deep model logits move by units, so the tolerance is derived
from transformers' own bf16-vs-fp32 difference on the same tokens (BF16_FACTOR times it).
"""

import functools
import os
from dataclasses import dataclass

from sed_megatron.models.model_file import MODEL_FILE, model_config_from_file
from sed_megatron.utils import UsageError

COMPUTE_DTYPES = ("float32", "bfloat16")
FP32_ATOL = 1e-3
"""fp32 on both sides differs by summation order only (~1e-6 on small models, ~1e-4 on 30 layers)."""
BF16_FACTOR = 2.0
"""bf16 tolerance = this x transformers' own bf16-vs-fp32 difference: each bf16 forward lies about
that far from fp32, in its own direction, so two correct ones can lie twice as far apart."""


@dataclass(frozen=True)
class Comparison:
    """The outcome, the same on every rank."""

    max_abs_logit_diff: float
    """Largest |Megatron logit - transformers logit| over the batch and the real vocabulary."""
    atol: float
    """The tolerance it is held to."""
    compute_dtype: str = "float32"
    reference_diff: float | None = None
    """bf16: transformers' own max |bf16 logit - fp32 logit| on the same tokens."""

    @property
    def ok(self):
        return self.max_abs_logit_diff <= self.atol

    def describe_tolerance(self):
        if self.reference_diff is None:
            return f"tolerance {self.atol:g} ({self.compute_dtype})"
        return (f"tolerance {self.atol:.4g} = {BF16_FACTOR:g} x transformers' own bf16-vs-fp32 difference "
                f"{self.reference_diff:.4g} on the same tokens")


def compare_hf_mcore(hf_dir, load, tp=1, pp=1, ep=1, atol=None, batch_size=2, seq_length=32, seed=0,
                     compute_dtype="float32"):
    """Max |logit difference| between transformers and the Megatron checkpoint; call on every rank
    of a world of tp * pp * ep processes (torchrun). ValueError with one line on bad input.

    atol: the tolerance (default: FP32_ATOL in fp32, BF16_FACTOR x transformers' own bf16 error)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"--compute-dtype {compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    loaded = model_config_from_file(load)
    if loaded is None:
        raise UsageError(f"{load}: no {MODEL_FILE} (convert with tools/convert_hf_to_mcore.py)")
    model_cfg, _ = loaded
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("batch_size", batch_size), ("seq_length", seq_length)):
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected at least 1, got {value}")
    if ep > 1 and model_cfg.num_experts is None:
        raise UsageError(f"--ep {ep}: {os.path.join(load, MODEL_FILE)} describes a dense model (no num_experts)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    processes = tp * pp * ep
    if world_size != processes:
        layout = f"--tp {tp}" + (f" --pp {pp}" if pp > 1 else "") + (f" --ep {ep}" if ep > 1 else "")
        raise UsageError(f"{layout} needs {processes} processes (torchrun --nproc_per_node {processes}), "
                         f"got {world_size}")
    if seq_length > model_cfg.max_position_embeddings:
        raise UsageError(f"--seq-length {seq_length} exceeds max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}")
    precision = ["--bf16"] if compute_dtype == "bfloat16" else []  # fp32: the stored weights upcast on load

    import torch
    import torch.distributed as dist

    from sed_megatron.parallel import model_groups, pipeline_stage
    from sed_megatron.runtime import prepare
    from sed_megatron.world import megatron_args, model_provider

    runtime = prepare(training=True)  # the device check; on a machine without a GPU, Megatron's CPU layer
    args = megatron_args(
        ["--load", load, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
         "--expert-model-parallel-size", str(ep), "--micro-batch-size", str(batch_size),
         "--global-batch-size", str(batch_size * world_size // (tp * pp)), "--seq-length", str(seq_length),
         "--train-iters", "1", "--finetune", "--no-load-optim", "--no-load-rng", *precision],
        runtime, "compare_hf_mcore.py")
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    try:
        from sed_megatron.lora import read_lora_file

        lora = read_lora_file(load)  # a LoRA checkpoint: its base, then its adapters (against the merged export)
        provider = model_provider
        if lora is not None:
            from sed_megatron.lora.checkpoint import base_checkpoint_dir

            provider = functools.partial(model_provider, lora=lora[0], lora_base=base_checkpoint_dir(load, lora[1]))
        model = get_model(functools.partial(provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
        load_checkpoint(model, None, None)
        for chunk in model:
            chunk.eval()
        device = next(model[0].parameters()).device
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_length), generator=gen)  # (b, s)
        b, s = tokens.shape
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)  # True = masked
        batch = (tokens.to(device), torch.arange(s, device=device).expand(b, s), causal.to(device))

        def forward_step(data_iterator, chunk):
            output = chunk(*next(data_iterator))  # last stage: logits (b, s, padded_vocab/tp)
            return output, lambda output_tensor, non_loss_data=False: output_tensor

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
                seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
        figures = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # the diff, the bf16 reference
        groups = model_groups(model[-1])
        _, last = pipeline_stage(groups.pp)
        if last:
            shard = outputs[0].contiguous()
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(parts, shard, group=groups.tp)
            logits = torch.cat(parts, dim=-1)[..., :model_cfg.vocab_size].float()  # (b, s, V)
            if dist.get_rank(group=groups.tp) == 0 and dist.get_rank(group=groups.dp) == 0:
                figures[0], figures[1] = _against_transformers(hf_dir, tokens, logits, compute_dtype, device)
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # every rank learns the reporter's figures
        diff, reference = float(figures[0]), (float(figures[1]) if figures[1] >= 0 else None)
        if atol is None:
            atol = FP32_ATOL if reference is None else BF16_FACTOR * reference
        return Comparison(diff, atol, compute_dtype, reference)
    finally:
        dist.destroy_process_group()


def _against_transformers(hf_dir, tokens, logits, compute_dtype, device):
    """(max |logits - transformers'|, transformers' own bf16-vs-fp32 difference or -1), logits (b, s, V).

    Transformers runs on the device Megatron ran on (a GPU, or the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)
    tokens = tokens.to(device)
    with torch.no_grad():
        fp32 = hf_model(tokens).logits  # (b, s, V)
        if compute_dtype == "float32":
            return float((logits - fp32).abs().max()), -1.0
        bf16 = hf_model.to(torch.bfloat16)(tokens).logits.float()
    return float((logits - bf16).abs().max()), float((bf16 - fp32).abs().max())
