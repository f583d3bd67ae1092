"""The end-to-end steps (preprocess, convert, train, calibrate, export, evaluate) as function calls.

The CPU quickstart and the GSM8K experiment share them. Each step calls the package function
that the matching tool calls: in-process where it holds no global state (preprocessing,
evaluation, plots), in a spawned process where Megatron's global state would outlive it (the
converters), and under torchrun where it needs several processes (training, calibration).
Results are read from the files the steps write (the calibrated config, metrics.jsonl,
RESULT.json), never from log text. Each step's output goes to `<workdir>/<step>.log`.
"""

import json
import os

import yaml

from .launch import run_isolated, torchrun


def cached_json(path, compute):
    """The JSON object at path, computed by compute() and written there (whole or not at all) on
    the first call: a step that a rerun skips."""
    from .utils import atomic_write_text

    if not os.path.exists(path):
        atomic_write_text(path, json.dumps(compute()))
    with open(path) as f:
        return json.load(f)


def write_run_yaml(path, *, data_prefix, iters, seed, loss, tp=1, micro_batch=8, global_batch=16, seq_length=64,
                   lr=2.0e-3, pack=False):
    """A training YAML for a converted checkpoint (the architecture comes from --load)."""
    config = {
        "parallel": {"tensor_model_parallel_size": tp},
        "training": {"micro_batch_size": micro_batch, "global_batch_size": global_batch, "train_iters": iters,
                     "seed": 1234 + seed, "seq_length": seq_length, "eval_iters": 0, "eval_interval": 10 ** 6},
        "optimizer": {"lr": lr, "min_lr": lr / 10, "lr_decay_style": "cosine",
                      "lr_warmup_iters": min(10, iters // 5), "adam_beta2": 0.95, "weight_decay": 0.0,
                      "clip_grad": 1.0},
        "checkpoint": {"save_interval": iters},
        "logging": {"log_interval": 5},
        "loss": loss,
        "data": {"kind": "indexed", "path": data_prefix, "valid_fraction": 0.05, "seed": seed, "pack": pack},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def save_tokenizer(backend, directory):
    """A `tokenizers` backend (trained with SPECIAL tokens) as an HF tokenizer with the chat template."""
    from transformers import PreTrainedTokenizerFast

    from sed_megatron.testing.tiny_hf import CHAT_TEMPLATE, SPECIAL

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory, len(tokenizer)


def random_llama(directory, tokenizer_dir, vocab_size, seed, *, hidden=128, ffn=256, layers=3, heads=4, groups=2,
                 max_positions=128):
    """A randomly initialised HF Llama (fp32, untied) whose responses end with the chat turn."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=hidden // heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"), pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def preprocess(input_path, tokenizer_dir, output_prefix, *, prompt_key, response_key, seq_length, truncation="error"):
    """Prompt/response JSONL -> indexed dataset at output_prefix; returns the summary."""
    from sed_megatron.data.sft_preprocess import PreprocessConfig
    from sed_megatron.data.sft_preprocess import preprocess as run

    return run(PreprocessConfig(input=input_path, tokenizer=tokenizer_dir, output_prefix=output_prefix,
                                seq_length=seq_length, prompt_key=prompt_key, response_key=response_key,
                                truncation=truncation), progress=False)


def convert(workdir, hf_dir, save):
    """The Hugging Face model at hf_dir as a Megatron checkpoint at save."""
    from sed_megatron.convert import convert_hf_to_mcore

    run_isolated(convert_hf_to_mcore, hf_dir, save, progress=False, log=os.path.join(workdir, "convert.log"))
    return save


def trained_to(save, iters):
    """Whether the checkpoint directory `save` holds a finished save of iteration `iters` (Megatron
    writes latest_checkpointed_iteration.txt after the checkpoint itself)."""
    from sed_megatron.runtime.mcore import TRACKER_FILE

    marker = os.path.join(save, TRACKER_FILE)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return f.read().strip() == str(iters)


def train(workdir, name, config, load, save, nproc=1, resume_iters=None):
    """Fine-tune from `load` (weights only) with the run YAML `config`; checkpoint at `save`.
    resume_iters: skip the run when `save` already holds that iteration (a rerun of an experiment)."""
    if resume_iters is not None and trained_to(save, resume_iters):
        return save
    torchrun("sed_megatron.train", ["--config", config, "--load", load, "--finetune", "--no-load-optim",
                                    "--no-load-rng", "--save", save], nproc, log=os.path.join(workdir, f"{name}.log"))
    return save


def calibrate_tau(workdir, config, load, out_config, mask_ratio, nproc=1):
    """τ of the model at `load` on the config's data; writes out_config (the config with tau set), returns τ."""
    torchrun("sed_megatron.cli.calibrate_tau", ["--config", config, "--mask-ratio", mask_ratio, "--load", load,
                                                "--write-config", out_config], nproc,
             log=os.path.join(workdir, "tau.log"))
    with open(out_config) as f:
        return float(yaml.safe_load(f)["loss"]["tau"])


def final_ce(ckpt):
    """The training CE of the last metrics.jsonl record (the mean of its log interval)."""
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["ce_loss"]


def export_and_evaluate(workdir, name, ckpt, hf_template, prompts, *, num_samples, max_new_tokens, seed,
                        temperature=1.0, prompt_key="question", answer_key="answer", batch_prompts=1,
                        strict_answers=False):
    """Export a run to HF (replacing <workdir>/hf_<name>, this step's own output, so that a rerun
    after an interruption can export again), sample num_samples responses per prompt; the metrics
    (+ final_ce), also written to <workdir>/eval_<name>.json."""
    from sed_megatron.convert import convert_mcore_to_hf
    from sed_megatron.eval.diversity import EvalConfig, evaluate_checkpoint
    from sed_megatron.utils import atomic_write_text

    hf_dir = os.path.join(workdir, f"hf_{name}")
    run_isolated(convert_mcore_to_hf, ckpt, hf_dir, hf_template=hf_template, progress=False, overwrite=True,
                 log=os.path.join(workdir, f"export_{name}.log"))
    cfg = EvalConfig(hf_dir=hf_dir, prompts=prompts, prompt_key=prompt_key, answer_key=answer_key,
                     num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_prompts=batch_prompts, strict_answers=strict_answers, quiet=True)
    result = evaluate_checkpoint(cfg)
    atomic_write_text(os.path.join(workdir, f"eval_{name}.json"), json.dumps(result, indent=1))
    return {**result, "final_ce": final_ce(ckpt)}


def plot(runs, out):
    """runs: {label: metrics.jsonl path}; the curves PNG at out."""
    from sed_megatron.training.curves import plot_runs, read_run

    plot_runs([read_run(f"{label}={path}") for label, path in runs.items()], out)
    return out
