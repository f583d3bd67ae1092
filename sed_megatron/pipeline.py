"""The end-to-end steps (preprocess, convert, train, calibrate, export, evaluate) as subprocesses.

The CPU quickstart and the GSM8K experiment drive the same command-line tools a user runs;
this module holds the pieces they share: running a step with its log, writing a run YAML,
saving a locally trained tokenizer and a random Llama, and export + evaluation of a run.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run_step(cmd, log_path, name="pipeline"):
    """Run cmd from the repository root, output to log_path; exit with the log's tail on failure."""
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-4000:]
        sys.exit(f"{name}: step failed ({' '.join(cmd[:4])} ...), log {log_path}:\n{tail}")
    return time.time() - started


def write_run_yaml(path, *, data_prefix, iters, seed, loss, tp=1, micro_batch=8, global_batch=16, seq_length=64,
                   lr=2.0e-3, pack=False):
    """A training YAML for a converted checkpoint (the architecture comes from --load)."""
    import yaml

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


def train(workdir, name, config, load, save, nproc=1, name_for_errors="pipeline"):
    """Fine-tune from `load` (weights only) with the run YAML `config`; checkpoint at `save`."""
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "-m", "sed_megatron.train", "--config", config, "--load", load,
           "--finetune", "--no-load-optim", "--no-load-rng", "--save", save]
    return run_step(cmd, os.path.join(workdir, f"{name}.log"), name_for_errors)


def calibrate_tau(workdir, config, load, out_config, mask_ratio, nproc=1, name_for_errors="pipeline"):
    """τ of the model at `load` on the config's data; writes out_config (the config with tau set)."""
    log = os.path.join(workdir, "tau.log")
    run_step([TORCHRUN, "--nproc_per_node", str(nproc), "tools/calibrate_tau.py", "--config", config,
              "--mask-ratio", str(mask_ratio), "--load", load, "--write-config", out_config], log, name_for_errors)
    with open(log) as f:
        return float(f.read().strip().splitlines()[-1].split("=")[1])


def export_and_evaluate(workdir, name, ckpt, hf_template, prompts, *, num_samples, max_new_tokens, seed,
                        temperature=1.0, prompt_key="question", answer_key="answer", batch_prompts=1,
                        strict_answers=False, name_for_errors="pipeline"):
    """Export a run to HF, sample num_samples responses per prompt and return the metrics (+ final CE)."""
    hf_dir = os.path.join(workdir, f"hf_{name}")
    run_step([PYTHON, "tools/convert_mcore_to_hf.py", "--load", ckpt, "--save", hf_dir, "--hf-template", hf_template],
             os.path.join(workdir, f"export_{name}.log"), name_for_errors)
    out = os.path.join(workdir, f"eval_{name}.json")
    cmd = [PYTHON, "tools/eval_diversity.py", "--hf-dir", hf_dir, "--prompts", prompts, "--prompt-key", prompt_key,
           "--answer-key", answer_key, "--num-samples", str(num_samples), "--max-new-tokens", str(max_new_tokens),
           "--temperature", str(temperature), "--seed", str(seed), "--batch-prompts", str(batch_prompts), "--out", out]
    run_step(cmd + (["--strict-answers"] if strict_answers else []), os.path.join(workdir, f"eval_{name}.log"),
             name_for_errors)
    with open(out) as f:
        result = json.load(f)
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        result["final_ce"] = [json.loads(line) for line in f][-1]["ce_loss"]
    return result
