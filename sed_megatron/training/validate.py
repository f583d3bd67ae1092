"""Start-up checks of a training run, in one place, before Megatron starts.

Every failure is one line that names the setting as the user wrote it: the flag, and the YAML
key (or the checkpoint's model file) it came from. The run then exits 2 before any process
group, model or file exists. Megatron-LM asserts many of these itself, later, as a bare
`AssertionError` behind a torchrun traceback.
"""

import os
from dataclasses import dataclass

from megatron.training.checkpointing import get_checkpoint_tracker_filename


class StartupError(ValueError):
    """A run that cannot work as configured; the message is one line."""


@dataclass
class Settings:
    """The parsed flags with the names the user knows them by."""

    args: object
    """The argparse namespace (before Megatron's validation)."""
    options: dict
    """{dest: long option}."""
    sources: dict
    """{dest: "file: section.key"} for settings that came from a YAML or a model file."""

    def name(self, dest, value=True):
        """'--flag VALUE (file: section.key)': the setting as the user wrote it."""
        option = self.options.get(dest, f"--{dest.replace('_', '-')}")
        current = getattr(self.args, dest)
        if value and current is not None and not isinstance(current, bool):
            option += f" {current}"
        return f"{option} ({self.sources[dest]})" if dest in self.sources else option

    def __getattr__(self, dest):
        return getattr(self.args, dest)


def _divisors(n):
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_required(s: Settings):
    for dest in ("micro_batch_size", "seq_length"):
        if getattr(s, dest) is None:
            raise StartupError(f"{s.name(dest)} is required (set it on the command line or in the YAML)")
    if s.train_iters is None and s.train_samples is None:
        raise StartupError(f"{s.name('train_iters')} is required (or --train-samples)")


def check_layout(s: Settings, world_size):
    """TP x PP x CP must divide the processes; TP must split the heads and query groups; EP the experts."""
    tp, pp, cp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size, s.context_parallel_size
    if world_size % (tp * pp * cp):
        raise StartupError(f"{s.name('tensor_model_parallel_size')} x {s.name('pipeline_model_parallel_size')} "
                           f"x {s.name('context_parallel_size')} = {tp * pp * cp} does not divide the "
                           f"{world_size} processes (torchrun --nproc_per_node x --nnodes)")
    if s.num_attention_heads is not None and s.num_attention_heads % tp:
        raise StartupError(f"{s.name('num_attention_heads')} does not split over "
                           f"{s.name('tensor_model_parallel_size')}: use a TP that divides it "
                           f"({_divisors(s.num_attention_heads)})")
    groups = s.num_query_groups if s.group_query_attention else None
    if groups is not None and groups % tp:
        raise StartupError(f"{s.name('num_query_groups')} does not split over "
                           f"{s.name('tensor_model_parallel_size')}: use a TP that divides it ({_divisors(groups)})")
    if s.num_layers is not None and s.num_layers % pp and s.decoder_first_pipeline_num_layers is None \
            and s.decoder_last_pipeline_num_layers is None and s.pipeline_model_parallel_layout is None:
        raise StartupError(f"{s.name('num_layers')} does not split evenly over "
                           f"{s.name('pipeline_model_parallel_size')} stages")
    ep, experts = s.expert_model_parallel_size, s.num_experts
    if ep > 1 and not experts:
        raise StartupError(f"{s.name('expert_model_parallel_size')} needs a model with experts (--num-experts)")
    if experts and experts % ep:
        raise StartupError(f"{s.name('num_experts')} does not split over "
                           f"{s.name('expert_model_parallel_size')} ({_divisors(experts)} do)")
    etp = s.expert_tensor_parallel_size or tp
    if experts and (world_size // pp) % (ep * etp):
        raise StartupError(f"{s.name('expert_model_parallel_size')} x expert TP {etp} does not divide the "
                           f"{world_size // pp} processes of a pipeline stage")


def check_batch(s: Settings, world_size):
    dp = world_size // (s.tensor_model_parallel_size * s.pipeline_model_parallel_size * s.context_parallel_size)
    if s.global_batch_size is not None and s.global_batch_size % (s.micro_batch_size * dp):
        raise StartupError(f"{s.name('global_batch_size')} is not a multiple of "
                           f"{s.name('micro_batch_size')} x {dp} data-parallel ranks "
                           f"= {s.micro_batch_size * dp}")


def check_schedule(s: Settings):
    if s.train_iters is None or s.lr_warmup_iters in (None, 0):
        return
    decay = s.lr_decay_iters if s.lr_decay_iters is not None else s.train_iters
    decay_name = s.name("lr_decay_iters") if s.lr_decay_iters is not None else s.name("train_iters")
    if s.lr_warmup_iters >= decay:
        raise StartupError(f"{s.name('lr_warmup_iters')} must be less than the decay "
                           f"iterations, {decay_name}")


def check_sequence_and_context_parallel(s: Settings):
    """What sequence and context parallelism need, with either layer implementation; and what
    the local layers' CP attention (all-gathered K and V over one CP group) does not do."""
    tp, cp = s.tensor_model_parallel_size, s.context_parallel_size
    if s.sequence_parallel and tp == 1:
        raise StartupError(f"{s.name('sequence_parallel')} needs more than one tensor-parallel rank "
                           f"({s.name('tensor_model_parallel_size')}): it splits the sequence over them; Megatron "
                           f"would drop it silently")
    if s.seq_length is not None and cp > 1 and s.seq_length % (2 * cp):
        raise StartupError(f"{s.name('seq_length')} is not a multiple of 2 x {s.name('context_parallel_size')} "
                           f"= {2 * cp}: each CP rank holds 2 of 2 x CP equal chunks of every sequence")
    if s.seq_length is not None and s.sequence_parallel and (s.seq_length // cp) % tp:
        raise StartupError(f"{s.name('seq_length')} / {s.name('context_parallel_size')} = {s.seq_length // cp} "
                           f"tokens per CP rank do not split over {s.name('tensor_model_parallel_size')} with "
                           f"{s.name('sequence_parallel')}")
    if s.transformer_impl != "local" or cp == 1:
        return
    for dest, why in (("hybrid_context_parallel", "hybrid context parallelism"),
                      ("hierarchical_context_parallel_sizes", "hierarchical context-parallel groups"),
                      ("window_size", "sliding-window attention")):
        if getattr(s.args, dest, None):
            raise StartupError(f"{s.name(dest)}: {why} needs Transformer Engine layers "
                               f"(--transformer-impl transformer_engine) with {s.name('context_parallel_size')}; "
                               f"the local layers' CP attention all-gathers K and V over one CP group")


def check_moe(s: Settings, training=True):
    """What MoE layers need beyond the layout (expert TP, the layer implementation, sequence
    parallelism to train under TP); returns notices."""
    if not s.num_experts:
        return []
    etp = s.expert_tensor_parallel_size or s.tensor_model_parallel_size
    etp_name = (s.name("expert_tensor_parallel_size") if s.expert_tensor_parallel_size
                else f"expert TP = {s.name('tensor_model_parallel_size')}")
    ffn, ffn_dest = ((s.moe_ffn_hidden_size, "moe_ffn_hidden_size") if s.moe_ffn_hidden_size
                     else (s.ffn_hidden_size, "ffn_hidden_size"))
    if ffn is not None and ffn % etp:
        raise StartupError(f"{s.name(ffn_dest)} (each expert's MLP) does not split over {etp_name}: use an "
                           f"--expert-tensor-parallel-size that divides it ({_divisors(ffn)})")
    if training and s.tensor_model_parallel_size > 1 and not s.sequence_parallel:
        raise StartupError(f"{s.name('tensor_model_parallel_size')} with MoE layers needs --sequence-parallel: "
                           f"Megatron's MoE layer refuses to train under tensor parallelism without it")
    if s.moe_grouped_gemm and s.transformer_impl == "local":
        raise StartupError(f"{s.name('moe_grouped_gemm')}: grouped GEMM experts need Transformer Engine layers "
                           f"(--transformer-impl transformer_engine); the local layers run one MLP per expert")
    if s.moe_expert_capacity_factor is not None:
        return [f"{s.name('moe_expert_capacity_factor')}: experts drop the tokens beyond their capacity "
                f"(a Hugging Face model drops none)"]
    return []


def has_checkpoint(directory):
    return bool(directory) and os.path.isfile(get_checkpoint_tracker_filename(directory))


def check_checkpoints(s: Settings):
    """A --load without a checkpoint is a typo unless it is the auto-resume pattern --load X --save X.

    Returns the notices to print (one line each) and the flags to add."""
    notices, extra = [], []
    if s.load and not has_checkpoint(s.load):
        same = s.save and os.path.abspath(s.load) == os.path.abspath(s.save)
        if s.finetune or not same:
            why = "--finetune starts from its weights" if s.finetune else "it differs from --save"
            raise StartupError(f"{s.name('load')}: no checkpoint there (no "
                               f"{os.path.basename(get_checkpoint_tracker_filename(s.load))}), and {why}: "
                               f"check the path (a random model would train otherwise)")
        notices.append(f"no checkpoint in {s.load} yet: training starts from the initial weights and saves there")
    elif s.load and s.ckpt_format == "torch_dist":
        found = check_checkpoint_files(s)
        notices += found[0]
        extra += found[1]
    if s.save and s.save_interval is None and s.train_iters is not None:
        extra += ["--save-interval", str(s.train_iters)]
        notices.append(f"--save {s.save} without --save-interval: saving at the end (iteration {s.train_iters})")
    return notices, extra


def check_checkpoint_files(s: Settings):
    """The checkpoint --load resolves to (its tracker, or --ckpt-step), and a LoRA checkpoint's base,
    whole before Megatron reads them (training/checkpoints.py: metadata read, files stat'ed).
    (notices, extra flags): --load-fallback loads an older complete one (--ckpt-step N)."""
    from .checkpoints import CheckpointError, check_load, checkpoint_problem, iteration_dir, tracked_iteration

    try:
        notice, older = check_load(s.load, s.ckpt_step, s.load_fallback)
        base = _lora_base(s)
        if base is not None and tracked_iteration(base) is not None:
            problem = checkpoint_problem(iteration_dir(base, tracked_iteration(base)))
            if problem:
                raise CheckpointError(f"{problem} (the base checkpoint of the adapters in {s.load})")
    except CheckpointError as err:
        raise StartupError(str(err)) from None
    if older is None:
        return [], []
    return [notice], ["--ckpt-step", str(older)]


def _lora_base(s: Settings):
    """The base checkpoint that the LoRA checkpoint in --load names, or None."""
    if not getattr(s.args, "lora_rank", 0):
        return None
    from sed_megatron.lora import read_lora_file
    from sed_megatron.lora.checkpoint import base_checkpoint_dir

    stored = read_lora_file(s.load)  # checked, with its base, before (parse.check_lora_args)
    return base_checkpoint_dir(s.load, stored[1]) if stored else None


def check_retention(s: Settings):
    keep = getattr(s.args, "save_keep_last", None)
    if keep is None:
        return
    if keep < 1:
        raise StartupError(f"{s.name('save_keep_last')} must be at least 1 (the checkpoint the tracker names is "
                           f"always kept; leave it out to keep every checkpoint)")
    if not s.save:
        raise StartupError(f"{s.name('save_keep_last')} deletes older checkpoints in --save: give --save too")


def check_data_files(s: Settings):
    """An indexed dataset whose .bin files hold what their .idx say, token and mask files agreeing.
    A prefix with no token index at all is left to the data loader (a recipe checked on a machine
    without its data passes)."""
    if getattr(s.args, "sft_data_kind", None) != "indexed" or not s.sft_data_path:
        return
    if not os.path.exists(s.sft_data_path + ".idx"):
        return
    from sed_megatron.data.integrity import indexed_sft_problem

    problem = indexed_sft_problem(s.sft_data_path)
    if problem:
        raise StartupError(f"{s.name('sft_data_path', value=False)}: {problem}")


def check_fault_injection(s: Settings):
    from .checkpoints import parse_save_error
    from .nonfinite import Injection

    try:
        if s.inject_non_finite:
            Injection.parse(s.inject_non_finite, clock=lambda: 0)
        if getattr(s.args, "inject_save_error", None):
            parse_save_error(s.inject_save_error)
    except ValueError as err:
        raise StartupError(str(err)) from None


def check_fused_linear(s: Settings):
    """The fused output-layer loss replaces the last stage's output layer and loss: what it cannot
    stand in for."""
    chunk = s.sft_fused_chunk_tokens
    if chunk is not None and chunk < 1:
        raise StartupError(f"{s.name('sft_fused_chunk_tokens')} must be at least 1")
    if not s.sft_fused_linear:
        for dest in ("sft_fused_chunk_tokens", "sft_fused_mode"):
            if getattr(s.args, dest) is not None:
                raise StartupError(f"{s.name(dest)} has no effect without {s.name('sft_fused_linear')}")
        return
    for dest, what in (("mtp_num_layers", "multi-token prediction layers"), ("use_mup", "muP's logit scaling")):
        if getattr(s.args, dest, None):
            raise StartupError(f"{s.name('sft_fused_linear')} with {s.name(dest)}: the fused loss computes only the "
                               f"output layer's logits, without {what}")
    if getattr(s.args, "defer_embedding_wgrad_compute", False):
        raise StartupError(f"{s.name('sft_fused_linear')} with {s.name('defer_embedding_wgrad_compute')}: the fused "
                           f"loss forms the output layer's weight gradient itself, so Megatron's deferred "
                           f"computation would find no activations to defer; drop one of them")


def check_weight_gradient_fusion(s: Settings):
    """Megatron options that need the fused weight-gradient accumulation (apex's extension)."""
    if getattr(s.args, "defer_embedding_wgrad_compute", False) and not s.gradient_accumulation_fusion:
        raise StartupError(f"{s.name('defer_embedding_wgrad_compute')} needs Megatron's gradient-accumulation "
                           f"fusion, which is off (--no-gradient-accumulation-fusion: given, or apex's "
                           f"fused_weight_gradient_mlp_cuda is not installed)")


def validate_run(settings: Settings, world_size, training=True):
    """(notices, extra flags); StartupError on the first problem. training=False: a tool that runs
    the model forward only (compare, calibration, the converters)."""
    check_required(settings)
    check_fault_injection(settings)
    check_retention(settings)
    found = check_checkpoints(settings)  # first: a mistyped --load matters more than the rest
    check_data_files(settings)
    check_layout(settings, world_size)
    check_batch(settings, world_size)
    check_schedule(settings)
    check_sequence_and_context_parallel(settings)
    check_fused_linear(settings)
    check_weight_gradient_fusion(settings)
    notices, extra = found
    return notices + check_moe(settings, training), extra
