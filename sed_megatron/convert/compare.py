"""The same tokens through transformers and through the Megatron checkpoint at TP x PP (x EP).

    torchrun --nproc_per_node 2 tools/compare_hf_mcore.py --hf-dir HF_DIR --load CKPT_DIR --tp 2
    result = compare_hf_mcore(hf_dir, load, tp=2)        # on every rank of a 2-process world

Loads the checkpoint (architecture from its sed_megatron_model.yaml) the way training does
(Megatron's load_checkpoint, resharded to the layout, the training model provider), runs a
seeded batch of random token ids through Megatron's pipeline schedule (forward only), gathers
the last stage's vocab-parallel logits, drops the padding ids and compares with the Hugging
Face model's logits (fp32). The default tolerance is 1e-3 for an fp32 checkpoint and 0.5 for
bf16/fp16, whose Megatron forward runs in that precision.
"""

import functools
import os
from dataclasses import dataclass

from sed_megatron.utils import UsageError

from .checkpoint import MODEL_FILE, model_config_from_file


@dataclass(frozen=True)
class Comparison:
    """The outcome, the same on every rank."""

    max_abs_logit_diff: float
    """Largest |Megatron logit - transformers logit| over the batch and the real vocabulary."""
    atol: float
    """The tolerance it is held to."""

    @property
    def ok(self):
        return self.max_abs_logit_diff <= self.atol


def default_atol(dtype_name):
    # fp32 on both sides differs by summation order only (~1e-6); a bf16/fp16 Megatron forward
    # rounds every activation to 8 (11) mantissa bits, and logits of a few units move by ~0.1.
    return 0.5 if dtype_name in ("bfloat16", "float16") else 1e-3


def compare_hf_mcore(hf_dir, load, tp=1, pp=1, ep=1, atol=None, batch_size=2, seq_length=32, seed=0):
    """Max |logit difference| between transformers and the Megatron checkpoint; call on every rank
    of a world of tp * pp * ep processes (torchrun). ValueError with one line on bad input."""
    loaded = model_config_from_file(load)
    if loaded is None:
        raise UsageError(f"{load}: no {MODEL_FILE} (convert with tools/convert_hf_to_mcore.py)")
    model_cfg, dtype_name = loaded
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
    precision = {"bfloat16": ["--bf16"], "float16": ["--fp16"]}.get(dtype_name, [])
    atol = default_atol(dtype_name) if atol is None else atol

    import torch
    import torch.distributed as dist

    from sed_megatron.runtime import prepare
    from sed_megatron.training.setup import model_provider, parse_run_args

    runtime = prepare(training=True)  # the device check; on a machine without a GPU, Megatron's CPU layer
    args, _ = parse_run_args(
        ["--load", load, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
         "--expert-model-parallel-size", str(ep), "--micro-batch-size", str(batch_size),
         "--global-batch-size", str(batch_size * world_size // (tp * pp)), "--seq-length", str(seq_length),
         "--train-iters", "1", "--finetune", "--no-load-optim", "--no-load-rng", *precision],
        runtime, need_loss_config=False, prog="compare_hf_mcore.py")
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    initialize_megatron(allow_no_cuda=runtime.on_cpu)
    try:
        model = get_model(functools.partial(model_provider, args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
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
        diff = torch.full((1,), -1.0, dtype=torch.float64, device=device)
        reporter = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_data_parallel_rank() == 0)
        if parallel_state.is_pipeline_last_stage():
            shard = outputs[0].contiguous()
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)[..., :model_cfg.vocab_size].float().cpu()  # (b, s, V)
            if reporter:
                from transformers import AutoModelForCausalLM

                hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
                with torch.no_grad():
                    expected = hf_model(tokens).logits  # (b, s, V)
                diff[0] = float((logits - expected).abs().max())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # every rank learns the reporter's figure
        return Comparison(float(diff.item()), atol)
    finally:
        dist.destroy_process_group()
