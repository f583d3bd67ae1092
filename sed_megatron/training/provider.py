"""What a run builds from Megatron's validated args: the typed ModelConfig, the GPTModel of a
pipeline stage (Megatron's model_provider) and the StepConfig of its forward step.

    model_cfg = model_config_from_args(args); step_cfg = step_config(args, loss_cfg)
"""

from .datasets import packs_thd
from .parse import fail


def step_config(args, loss_cfg):
    from .batch import BatchSpec
    from .step import StepConfig

    batch = BatchSpec(
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        create_attention_mask=args.create_attention_mask_in_dataloader and not packs_thd(args),
        packed_thd=packs_thd(args),
    )
    inject = None
    if args.inject_non_finite:
        from .nonfinite import Injection

        try:  # Megatron's loop counts finished iterations in args.curr_iteration
            inject = Injection.parse(args.inject_non_finite, clock=lambda: args.curr_iteration + 1)
        except ValueError as err:
            fail(str(err))
    from sed_megatron.loss.fused_linear import SCHEMES

    return StepConfig(loss=loss_cfg, batch=batch, with_entropy=args.log_entropy, vocab_size=args.vocab_size,
                      check_non_finite=args.check_for_nan_in_loss_and_grad, inject=inject,
                      fused_linear=args.sft_fused_linear, fused_chunk_tokens=args.sft_fused_chunk_tokens,
                      fused_grad_in_forward=None if args.sft_fused_mode is None else SCHEMES[args.sft_fused_mode])
