"""Every bad input and fault tried on the entry points, run, and written as docs/RELIABILITY.md.

    python -m tests.reliability --write docs/RELIABILITY.md     # regenerate (from the repo root)
    python -m tests.reliability --out /tmp/r.md                 # what tests/test_reliability.py compares

Bad inputs run in this process, one after the other: each calls its tool's `main(argv)` and
records the exit code, the first line on stderr and what is left at the output path. Faults
that need a process to be killed or a run to train (kill -9 during a save, NaN steps, ...) are
rows that name the test that checks them; the generator checks that the test exists.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "examples/tiny_cpu.yaml"

ENTRY = {  # name -> (module whose main(argv) runs it, the command a user types)
    "train": ("sed_megatron.train", "torchrun --nproc_per_node {nproc} -m sed_megatron.train"),
    "calibrate": ("sed_megatron.cli.calibrate_tau", "python tools/calibrate_tau.py"),
    "preprocess": ("sed_megatron.cli.preprocess_sft_data", "python tools/preprocess_sft_data.py"),
    "import": ("sed_megatron.cli.convert_hf_to_mcore", "python tools/convert_hf_to_mcore.py"),
    "export": ("sed_megatron.cli.convert_mcore_to_hf", "python tools/convert_mcore_to_hf.py"),
    "compare": ("sed_megatron.cli.compare_hf_mcore", "torchrun tools/compare_hf_mcore.py"),
    "gguf": ("sed_megatron.cli.gguf_to_hf", "python tools/gguf_to_hf.py"),
    "eval": ("sed_megatron.cli.eval_diversity", "python tools/eval_diversity.py"),
    "plot": ("sed_megatron.cli.plot_metrics", "python tools/plot_metrics.py"),
}


@dataclass
class Case:
    entry: str
    what: str
    argv: list
    """Arguments; "{tmp}" stands for the case's scratch directory."""
    expect: str
    """A regular expression the one stderr line must match (after `prog: error: `)."""
    output: str | None = None
    """The path whose state after the failure is reported ("nothing at ..." or its files)."""
    files: dict = field(default_factory=dict)
    """Files to create first: relative path -> text (or bytes)."""
    env: dict = field(default_factory=dict)
    code: int = 2


CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]})


def _yaml_edit(**sections):
    """tiny_cpu.yaml with sections replaced (a section None: removed)."""
    import yaml

    with open(os.path.join(REPO, TINY)) as f:
        config = yaml.safe_load(f)
    for name, body in sections.items():
        if body is None:
            config.pop(name, None)
        else:
            config[name] = body
    return yaml.safe_dump(config)


def _tiny_model(**model):
    import yaml

    with open(os.path.join(REPO, TINY)) as f:
        base = yaml.safe_load(f)["model"]
    return _yaml_edit(model={**base, **model})


def _parquet(rows):
    """A parquet file's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def cases():
    train = "train"
    two = {"WORLD_SIZE": "2"}
    return [
        Case(train, "config file missing", ["--config", "{tmp}/none.yaml"], r"none\.yaml: cannot read the config file"),
        Case(train, "config not YAML", ["--config", "{tmp}/bad.yaml"], r"bad\.yaml:2: not valid YAML",
             files={"bad.yaml": "model: [1, 2\n"}),
        Case(train, "config top level not a mapping", ["--config", "{tmp}/list.yaml"],
             r"the top level must be a mapping", files={"list.yaml": "- 1\n- 2\n"}),
        Case(train, "unknown section", ["--config", "{tmp}/c.yaml"], r"unknown section 'modle'",
             files={"c.yaml": "modle: {num_layers: 2}\n"}),
        Case(train, "unknown loss key", ["--config", "{tmp}/c.yaml"], r"loss\.tua: unknown key",
             files={"c.yaml": "loss: {tua: 0.5}\n"}),
        Case(train, "unknown Megatron flag in the YAML", ["--config", "{tmp}/c.yaml"],
             r"model\.num_layer: unknown Megatron-LM flag --num-layer", files={"c.yaml": "model: {num_layer: 2}\n"}),
        Case(train, "a switch given a value", ["--config", "{tmp}/c.yaml"], r"--swiglu is a switch",
             files={"c.yaml": "model: {swiglu: 3}\n"}),
        Case(train, "empty YAML (no batch size)", ["--config", "{tmp}/empty.yaml"],
             r"--micro-batch-size is required", files={"empty.yaml": ""}),
        Case(train, "SED without tau", ["--config", "{tmp}/c.yaml"], r"--sed-tau \(loss\.tau\): SED with mask",
             files={"c.yaml": _yaml_edit(loss={"kind": "sed"})}),
        Case(train, "tau outside (0, 1]", ["--config", TINY, "--sed-tau", "1.5"], r"--sed-tau \(loss\.tau\): must lie"),
        Case(train, "top-k of 0", ["--config", TINY, "--sed-top-k", "0"], r"--sed-top-k \(loss\.top_k\): must be"),
        Case(train, "calibration top-k of 0", ["--config", TINY, "--sed-calibrate-top-k", "0"],
             r"--sed-calibrate-top-k \(loss\.calibrate_top_k\): must be an integer >= 1, got 0"),
        Case(train, "unknown loss kind", ["--config", TINY, "--loss-type", "focal"], r"invalid choice: 'focal'"),
        Case(train, "--load typo with --finetune", ["--config", TINY, "--load", "{tmp}/ckpt-typo", "--finetune",
                                                    "--save", "{tmp}/out"],
             r"--load .*ckpt-typo: no checkpoint there .* --finetune", output="{tmp}/out"),
        Case(train, "--load without a checkpoint, other --save", ["--config", TINY, "--load", "{tmp}/nothing",
                                                                  "--save", "{tmp}/out"],
             r"no checkpoint there .* differs from --save", output="{tmp}/out"),
        Case(train, "heads that TP does not split", ["--config", "{tmp}/c.yaml"],
             r"--num-attention-heads 9 .* does not split over --tensor-model-parallel-size 2",
             files={"c.yaml": _tiny_model(num_attention_heads=9, num_query_groups=3, kv_channels=8)}, env=two),
        Case(train, "TP x PP does not divide the processes", ["--config", TINY, "--pipeline-model-parallel-size", "2"],
             r"= 4 does not divide the 2 processes", env=two),
        Case(train, "layers that PP does not split", ["--config", TINY, "--tensor-model-parallel-size", "1",
                                                      "--pipeline-model-parallel-size", "3"],
             r"--num-layers 2 .* does not split evenly over", env={"WORLD_SIZE": "3"}),
        Case(train, "global batch not a multiple", ["--config", TINY, "--global-batch-size", "6"],
             r"--global-batch-size 6 is not a multiple of --micro-batch-size 4", env=two),
        Case(train, "warm-up longer than the run", ["--config", TINY, "--train-iters", "3"],
             r"--lr-warmup-iters 5 .* must be less than the decay iterations, --train-iters 3", env=two),
        Case(train, "experts without an MoE model", ["--config", TINY, "--expert-model-parallel-size", "2"],
             r"needs a model with experts", env=two),
        Case(train, "sequence parallelism without TP", ["--config", TINY, "--tensor-model-parallel-size", "1",
                                                        "--sequence-parallel"],
             r"--sequence-parallel needs more than one tensor-parallel rank", env=two),
        Case(train, "sequence length that CP does not split", ["--config", TINY, "--tensor-model-parallel-size", "1",
                                                               "--context-parallel-size", "2", "--seq-length", "62"],
             r"--seq-length 62 is not a multiple of 2 x --context-parallel-size 2 = 4", env=two),
        Case(train, "a fused-loss chunk of 0 tokens", ["--config", TINY, "--sft-fused-linear", "--sft-fused-chunk-tokens",
                                                        "0"], r"--sft-fused-chunk-tokens 0 must be at least 1", env=two),
        Case(train, "a fused-loss scheme without the fused loss", ["--config", TINY, "--sft-fused-mode", "recompute"],
             r"--sft-fused-mode recompute has no effect without --sft-fused-linear", env=two),
        Case(train, "the fused loss with Megatron's deferred embedding gradient",
             ["--config", TINY, "--sft-fused-linear", "--defer-embedding-wgrad-compute", "--tensor-model-parallel-size",
              "1", "--pipeline-model-parallel-size", "2"],
             r"--sft-fused-linear with --defer-embedding-wgrad-compute: the fused loss forms", env=two),
        Case(train, "Transformer Engine asked for and not importable",
             ["--config", TINY, "--transformer-impl", "transformer_engine"],
             r"--transformer-impl transformer_engine: Transformer Engine cannot be used \(transformer_engine is not "
             r"installed\)", env=two),
        Case(train, "indexed data without a path", ["--config", TINY, "--sft-data-kind", "indexed"],
             r"--sft-data-kind indexed needs --sft-data-path"),
        Case(train, "packing without indexed data", ["--config", TINY, "--sft-pack"],
             r"--sft-pack needs --sft-data-kind indexed"),
        Case(train, "a bad fault injection", ["--config", TINY, "--inject-non-finite", "soon"],
             r"--inject-non-finite 'soon': expected ITERATION:loss or ITERATION:grad", env=two),
        Case(train, "LoRA settings without a rank", ["--config", TINY, "--lora-alpha", "16"],
             r"--lora-alpha \(lora\.alpha\) is given but --lora-rank \(lora\.rank\) is 0 or absent"),
        Case(train, "an unknown LoRA target module", ["--config", TINY, "--lora-rank", "4", "--lora-target-modules",
                                                      "q_proj,qkv_proj"],
             r"--lora-target-modules \(lora\.target_modules\): unknown target module 'qkv_proj'"),
        Case(train, "a LoRA alpha of 0", ["--config", TINY, "--lora-rank", "4", "--lora-alpha", "0"],
             r"--lora-alpha \(lora\.alpha\): must be > 0, got 0\.0"),
        Case(train, "LoRA without a base checkpoint", ["--config", TINY, "--lora-rank", "4"],
             r"--lora-rank trains adapters on a base model: give its checkpoint with --load"),
        Case(train, "LoRA of another rank than the adapters in --load", ["--config", TINY, "--lora-rank", "4", "--load",
                                                                         "{tmp}/ckpt"],
             r"--lora-rank 4 differs from the adapters in .*ckpt \(sed_megatron_lora\.json: rank 8\)",
             files={"ckpt/sed_megatron_lora.json": json.dumps({"rank": 8, "alpha": 16, "base": "base"})}),
        Case(train, "a LoRA checkpoint whose base checkpoint moved", ["--config", TINY, "--lora-rank", "4", "--load",
                                                                      "{tmp}/ckpt"],
             r"ckpt/sed_megatron_lora\.json: its base checkpoint 'moved/base' is not there",
             files={"ckpt/sed_megatron_lora.json": json.dumps({"rank": 4, "alpha": 8, "base": "moved/base"})}),
        Case(train, "--save-hf without --save", ["--config", TINY, "--save", "", "--save-hf", "{tmp}/hf_out"],
             r"--save-hf exports the newest checkpoint in --save: give --save too", output="{tmp}/hf_out", env=two),
        Case(train, "chat data without a tokenizer", ["--config", TINY, "--sft-data-kind", "chat", "--sft-data-path",
                                                     "{tmp}/chats.jsonl"],
             r"--sft-data-kind chat tokenizes --sft-data-path with a Hugging Face tokenizer: give --sft-tokenizer",
             files={"chats.jsonl": CHAT + "\n"}, env=two),
        Case(train, "chat data with a bad row", ["--config", TINY, "--sft-data-kind", "chat", "--sft-data-path",
                                                "{tmp}/chats.jsonl", "--sft-tokenizer", "{tok}", "--save", "{tmp}/s"],
             r"--sft-data-path: .*chats\.jsonl:2: malformed JSON", files={"chats.jsonl": CHAT + "\n{oops\n"},
             env=two),
        Case(train, "a Hugging Face --load without --save or --hf-cache-dir", ["--config", TINY, "--load", "{hf}", "--save", ""],
             r"--load .*: its conversion needs --save \(it is cached there\) or --hf-cache-dir", env=two),
        Case(train, "a Hugging Face --load of an unsupported family", ["--config", TINY, "--load", "{tmp}/gpt2",
                                                                       "--save", "{tmp}/out"],
             r"--load .*gpt2: .*model_type 'gpt2'", output="{tmp}/out/hf_converted",
             files={"gpt2/config.json": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})}),
        Case(train, "SED_MEGATRON_DEVICE misspelt", ["--config", TINY], r"SED_MEGATRON_DEVICE='gpu': expected one of",
             env={"SED_MEGATRON_DEVICE": "gpu"}),
        Case(train, "a checkpoint shard cut short (an older complete checkpoint beside it)",
             ["--config", TINY, "--load", "{ckpt_cut}", "--save", "{tmp}/out"],
             r"ckpt_cut/iter_0000004/__0_0\.distcp: truncated: \d+ of \d+ bytes \(the checkpoint of iteration 4, "
             r"which .*latest_checkpointed_iteration\.txt names\); --load-fallback would load iteration 2",
             output="{tmp}/out", env=two),
        Case(train, "a checkpoint without its .metadata (copied before its save finished)",
             ["--config", TINY, "--load", "{ckpt_unfinished}", "--save", "{tmp}/out"],
             r"iter_0000004/\.metadata: missing \(the save of this checkpoint did not finish\) .*; no older complete "
             r"checkpoint in ", output="{tmp}/out", env=two),
        Case(train, "a checkpoint shard missing", ["--config", TINY, "--load", "{ckpt_no_shard}", "--save",
                                                   "{tmp}/out"],
             r"iter_0000004/__0_0\.distcp: missing \(\.metadata lists \d+ bytes of items in it\)",
             output="{tmp}/out", env=two),
        Case(train, "an indexed dataset whose .bin is cut short", ["--config", TINY, "--sft-data-kind", "indexed",
                                                                  "--sft-data-path", "{ds_cut}", "--save", "{tmp}/out"],
             r"--sft-data-path: .*ds_cut\.bin: truncated: 60 of 84 bytes \(its ds_cut\.idx says\)",
             output="{tmp}/out", env=two),
        Case(train, "loss-mask files of another dataset", ["--config", TINY, "--sft-data-kind", "indexed",
                                                          "--sft-data-path", "{ds_mismatch}", "--save", "{tmp}/out"],
             r"ds_mismatch_loss_mask\.idx: sample 1 has 8 loss-mask values but 7 tokens in", output="{tmp}/out",
             env=two),
        Case(train, "--save-keep-last 0", ["--config", TINY, "--save-keep-last", "0"],
             r"--save-keep-last 0 must be at least 1", env=two),
        Case(train, "a bad save-error injection", ["--config", TINY, "--inject-save-error", "4:FULL"],
             r"--inject-save-error '4:FULL': expected ITERATION:ENOSPC\|EIO\|EDQUOT", env=two),
        Case(train, "a negative hang timeout", ["--config", TINY, "--hang-timeout-minutes", "-1"],
             r"--hang-timeout-minutes -1: must be >= 0 \(0: no hang detection\)", env=two),
        Case(train, "a bad worker-fault injection", ["--config", TINY, "--inject-fault", "3:explode"],
             r"--inject-fault '3:explode': expected ITERATION:kill\|stop\|raise", env=two),
        Case("calibrate", "mask ratio outside [0, 1]", ["--config", TINY, "--mask-ratio", "1.5"],
             r"--mask-ratio must lie in \[0, 1\], got 1\.5"),
        Case("calibrate", "no calibration samples", ["--config", TINY, "--mask-ratio", "0.7",
                                                     "--calibration-samples", "0"],
             r"--calibration-samples must be >= 1"),
        Case("calibrate", "calibration top-k of 0", ["--config", TINY, "--mask-ratio", "0.7",
                                                     "--calibration-top-k", "0"],
             r"--calibration-top-k must be >= 1, got 0"),
        Case("calibrate", "--write-config without --config", ["--mask-ratio", "0.7", "--write-config", "{tmp}/o.yaml",
                                                              "--micro-batch-size", "1", "--seq-length", "8"],
             r"--write-config needs --config", output="{tmp}/o.yaml"),
        Case("preprocess", "input file missing", ["--input", "{tmp}/none.jsonl", "--tokenizer", "{tok}",
                                                  "--output-prefix", "{tmp}/ds"], r"none\.jsonl: no such input file",
             output="{tmp}/ds.bin"),
        Case("preprocess", "malformed JSON line", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}",
                                                   "--output-prefix", "{tmp}/ds"],
             r"in\.jsonl:2: malformed JSON", output="{tmp}/ds.bin", files={"in.jsonl": CHAT + "\n{oops\n"}),
        Case("preprocess", "missing response field", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}",
                                                      "--output-prefix", "{tmp}/ds"],
             r"in\.jsonl:1: missing field 'response'", output="{tmp}/ds.bin",
             files={"in.jsonl": json.dumps({"prompt": "hi"}) + "\n"}),
        Case("preprocess", "unknown role", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}", "--output-prefix",
                                            "{tmp}/ds"], r"in\.jsonl:1: message 0: unknown role 'robot'",
             output="{tmp}/ds.bin", files={"in.jsonl": json.dumps({"messages": [{"role": "robot", "content": "x"}]})
                                           + "\n"}),
        Case("preprocess", "bytes that are not UTF-8", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}",
                                                        "--output-prefix", "{tmp}/ds"],
             r"in\.jsonl:1: not valid UTF-8", output="{tmp}/ds.bin", files={"in.jsonl": b"\xff\xfe{}\n"}),
        Case("preprocess", "sample longer than --seq-length", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}",
                                                               "--output-prefix", "{tmp}/ds", "--seq-length", "4"],
             r"in\.jsonl:1: sample of \d+ tokens exceeds --seq-length \+ 1 = 5", output="{tmp}/ds.bin",
             files={"in.jsonl": CHAT + "\n"}),
        Case("preprocess", "tokenizer without a chat template", ["--input", "{tmp}/in.jsonl", "--tokenizer",
                                                                 "{tok_plain}", "--output-prefix", "{tmp}/ds"],
             r"no chat template", output="{tmp}/ds.bin", files={"in.jsonl": CHAT + "\n"}),
        Case("preprocess", "--vocab-size below the tokenizer's", ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}",
                                                                  "--output-prefix", "{tmp}/ds", "--vocab-size", "5"],
             r"--vocab-size 5 is smaller than the tokenizer's", output="{tmp}/ds.bin",
             files={"in.jsonl": CHAT + "\n"}),
        Case("preprocess", "parquet row without a schema's fields", ["--input", "{tmp}/in.parquet", "--tokenizer",
                                                                     "{tok}", "--output-prefix", "{tmp}/ds"],
             r"in\.parquet: row 1: no schema's fields \(it has 'question', 'answer'", output="{tmp}/ds.bin",
             files={"in.parquet": _parquet([{"question": "hi", "answer": "hello"}])}),
        Case("preprocess", "ShareGPT turn from an unknown speaker", ["--input", "{tmp}/in.parquet", "--tokenizer",
                                                                    "{tok}", "--output-prefix", "{tmp}/ds"],
             r"in\.parquet: row 1: message 1: unknown role 'robot'", output="{tmp}/ds.bin",
             files={"in.parquet": _parquet([{"conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "robot", "value": "hello"}]}])}),
        Case("preprocess", "reasoning field with a chat template that cannot render it (--reasoning field)",
             ["--input", "{tmp}/in.jsonl", "--tokenizer", "{tok}", "--output-prefix", "{tmp}/ds", "--reasoning",
              "field"],
             r"in\.jsonl:1: message 1: reasoning, which the chat template of .* does not render as "
             r"'reasoning_content' \(--reasoning field\)", output="{tmp}/ds.bin",
             files={"in.jsonl": json.dumps({"messages": [
                 {"role": "user", "content": "hello"},
                 {"role": "assistant", "content": "hi", "reasoning_content": "there"}]}) + "\n"}),
        Case("preprocess", "<think> without </think> in an assistant turn", ["--input", "{tmp}/in.jsonl", "--tokenizer",
                                                                            "{tok}", "--output-prefix", "{tmp}/ds"],
             r"in\.jsonl:1: message 1: '<think>' without '</think>'", output="{tmp}/ds.bin",
             files={"in.jsonl": json.dumps({"messages": [
                 {"role": "user", "content": "hello"}, {"role": "assistant", "content": "<think> there hi"}]}) + "\n"}),
        Case("preprocess", "directory without shards", ["--input", "{tmp}/shards", "--tokenizer", "{tok}",
                                                        "--output-prefix", "{tmp}/ds"],
             r"shards: a directory without \.jsonl or \.parquet files", output="{tmp}/ds.bin",
             files={"shards/README.md": "no data here"}),
        Case("preprocess", "hf:NAME not in the local cache", ["--input", "hf:sed-megatron-tests/absent", "--tokenizer",
                                                              "{tok}", "--output-prefix", "{tmp}/ds"],
             r"--input hf:sed-megatron-tests/absent: not in the local Hugging Face cache \(no network is used",
             output="{tmp}/ds.bin"),
        Case("import", "no config.json", ["--hf-dir", "{tmp}", "--save", "{tmp}/out"], r"no config\.json",
             output="{tmp}/out"),
        Case("import", "unsupported model_type", ["--hf-dir", "{tmp}/gpt2", "--save", "{tmp}/out"],
             r"model_type 'gpt2'", output="{tmp}/out",
             files={"gpt2/config.json": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})}),
        Case("import", "an MoE variant not covered (decoder_sparse_step 2)", ["--hf-dir", "{tmp}/moe", "--save",
                                                                               "{tmp}/out"],
             r"decoder_sparse_step", output="{tmp}/out",
             files={"moe/config.json": json.dumps({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                                                   "decoder_sparse_step": 2, "num_experts": 6,
                                                   "num_experts_per_tok": 2})}),
        Case("import", "a shard listed in the index is missing", ["--hf-dir", "{hf_missing_shard}", "--save",
                                                                  "{tmp}/out"],
             r"shard listed in the index is missing", output="{tmp}/out"),
        Case("import", "non-empty --save", ["--hf-dir", "{hf}", "--save", "{tmp}/full"],
             r"output directory is not empty \(use --overwrite\)", output=None, files={"full/keep.txt": "mine"}),
        Case("import", "a PEFT adapter that is not plain LoRA (DoRA)", ["--hf-dir", "{hf}", "--adapter", "{tmp}/ad",
                                                                        "--save", "{tmp}/out"],
             r"ad/adapter_config\.json: use_dora=True is not supported", output="{tmp}/out",
             files={"ad/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"], "use_dora": True})}),
        Case("export", "--load is not a converted or trained checkpoint", ["--load", "{tmp}", "--save", "{tmp}/out"],
             r"no sed_megatron_model\.yaml", output="{tmp}/out"),
        Case("export", "--hf-template without config.json", ["--load", "{tmp}", "--save", "{tmp}/out",
                                                             "--hf-template", "{tmp}/nothing"],
             r"sed_megatron_model\.yaml|no config\.json", output="{tmp}/out"),
        Case("compare", "--load is not a converted checkpoint", ["--hf-dir", "{hf}", "--load", "{tmp}", "--tp", "1"],
             r"no sed_megatron_model\.yaml"),
        Case("gguf", "GGUF file missing", ["--gguf", "{tmp}/none.gguf", "--save", "{tmp}/out"], r"none\.gguf",
             output="{tmp}/out"),
        Case("gguf", "not a GGUF file", ["--gguf", "{tmp}/fake.gguf", "--save", "{tmp}/out"], r"fake\.gguf",
             output="{tmp}/out", files={"fake.gguf": "not a gguf file at all"}),
        Case("eval", "--hf-dir is not a model directory", ["--hf-dir", "{tmp}/nothing", "--prompts", "{tmp}/p.jsonl",
                                                           "--out", "{tmp}/r.json"],
             r"--hf-dir .*nothing: no config\.json", output="{tmp}/r.json",
             files={"p.jsonl": json.dumps({"prompt": "hi"}) + "\n"}),
        Case("eval", "prompts file missing", ["--hf-dir", "{hf}", "--prompts", "{tmp}/none.jsonl", "--out",
                                              "{tmp}/r.json"], r"none\.jsonl", output="{tmp}/r.json"),
        Case("eval", "--k above --num-samples", ["--hf-dir", "{hf}", "--prompts", "{tmp}/p.jsonl", "--num-samples",
                                                 "2", "--k", "4", "--out", "{tmp}/r.json"],
             r"--k must lie in \[1, --num-samples = 2\], got 4", output="{tmp}/r.json",
             files={"p.jsonl": json.dumps({"prompt": "hi"}) + "\n"}),
        Case("eval", "a prompt line that is not JSON", ["--hf-dir", "{hf}", "--prompts", "{tmp}/p.jsonl", "--out",
                                                        "{tmp}/r.json"], r"p\.jsonl:2: not JSON", output="{tmp}/r.json",
             files={"p.jsonl": json.dumps({"prompt": "hi"}) + "\n{oops\n"}),
        Case("plot", "a metrics line that is not JSON", ["{tmp}/m.jsonl", "--out", "{tmp}/c.png"],
             r"m\.jsonl:2: not JSON", output="{tmp}/c.png", files={"m.jsonl": '{"iteration": 1}\n{oops\n'}),
        Case("plot", "metrics file missing", ["{tmp}/none.jsonl", "--out", "{tmp}/c.png"], r"none\.jsonl",
             output="{tmp}/c.png"),
    ]


# Faults checked by their own tests (they kill processes or train): (entry, what, user sees, on disk, test).
FAULTS = [
    ("train", "kill -9 while writing a checkpoint's tensors", "the process dies",
     "the tracker still names the previous complete checkpoint; resume works",
     "tests/training/test_crash_safety.py::test_kill_during_a_save_leaves_a_complete_checkpoint"),
    ("train", "kill -9 before a checkpoint's metadata is written", "the process dies",
     "as above", "tests/training/test_crash_safety.py::test_kill_during_a_save_leaves_a_complete_checkpoint"),
    ("train", "kill -9 while the tracker file is replaced", "the process dies",
     "the old tracker (written atomically); resume works",
     "tests/training/test_crash_safety.py::test_kill_during_a_save_leaves_a_complete_checkpoint"),
    ("train", "a save that fails (its directory cannot be made)",
     "`error: iteration 4: FileExistsError: ... (the newest complete checkpoint in CKPT: iteration 2)`, exit 4",
     "the tracker stays on the last complete checkpoint",
     "tests/training/test_crash_safety.py::test_a_failing_save_stops_in_one_line"),
    ("train", "NaN loss", "`error: iteration 3: NaN in the loss (value nan, rank 0); stopped before the optimizer "
     "step ...`, exit 3", "no checkpoint holds the iteration; resume works",
     "tests/training/test_nonfinite.py::test_non_finite_stops_before_the_step_and_resumes"),
    ("train", "NaN gradients (finite loss)", "`error: iteration 3: NaN in the gradients (bucket 0) ...`, exit 3",
     "as above", "tests/training/test_nonfinite.py::test_non_finite_stops_before_the_step_and_resumes"),
    ("train", "SIGTERM (a scheduler's time limit)", "the workers finish the step, save and exit",
     "a checkpoint at the last step; resumes at another layout",
     "tests/training/test_train.py::test_sigterm_leaves_a_checkpoint_that_resumes_at_another_layout"),
    ("train", "SIGTERM to the launcher of self-started ranks (`python -m sed_megatron.train` at TP > 1, no torchrun)",
     "passed on to every rank, as torchrun does; the launcher waits for them and exits with their code",
     "as above", "tests/test_launch.py::test_sigterm_to_the_launcher_reaches_every_rank"),
    ("train", "a self-started rank killed (kill -9; no torchrun, so no restart)", "the other ranks get 5 s to "
     "report their error, then are stopped; exit 137 (128 + the signal)", "the newest complete checkpoint",
     "tests/test_launch.py::test_a_rank_killed_stops_the_others_and_names_the_signal"),
    ("train", "nvidia-smi lists GPUs that torch cannot see", "`error: nvidia-smi lists 2 GPU(s) but torch sees "
     "none ...`, exit 2", "nothing", "tests/runtime/test_runtime.py::test_training_entry_point_stops_on_invisible_gpus"),
    ("train", "a broken GPU driver (nvidia-smi fails)", "one line naming nvidia-smi's message, exit 2", "nothing",
     "tests/runtime/test_runtime.py::test_broken_driver_is_an_error"),
    ("train", "an unsupported megatron-core", "`error: megatron-core X is installed; sed_megatron supports "
     "megatron-core>=0.19.2,<0.20 ...`", "nothing", "tests/runtime/test_runtime.py::test_megatron_version_range"),
    ("train", "a Hugging Face --load that changed since its cached conversion", "`... changed since its conversion "
     "in CACHE: converted it again` (the log)", "the cache replaced by the new source's conversion",
     "tests/training/test_hf_one_command.py::test_hf_model_in_hf_model_out"),
    ("preprocess", "kill -9 in the middle of a multi-shard run (2 workers)", "the process dies, its workers with it",
     "nothing at the prefix; PREFIX.parts/ holds the finished units; the same command resumes (`resuming from "
     "PREFIX.parts: 2 of 6 unit(s) done ...`) to the bytes of an uninterrupted run",
     "tests/data/test_interrupted.py::test_preprocess_killed_mid_run_resumes_to_the_uninterrupted_output"),
    ("preprocess", "a rerun after an interruption with a changed input file or setting", "`PREFIX.parts: 4 finished "
     "unit(s) were made from another input or with other settings: redoing them` (or `... starting over`)",
     "the changed units redone, the others reused; the output as an uninterrupted run's",
     "tests/data/test_preprocess_units.py::test_an_interrupted_run_resumes_its_finished_units"),
    ("train", "a full disk during a save (`--inject-save-error 4:ENOSPC`)", "`error: iteration 4: OSError: [Errno 28] "
     "No space left on device (the newest complete checkpoint in CKPT: iteration 2)`, exit 4",
     "the tracker on iteration 2; iteration 4's directory without its .metadata (a resume saves over it)",
     "tests/training/test_checkpoint_faults.py::test_full_disk_retention_and_a_cut_checkpoint"),
    ("train", "`--save-keep-last 2`", "`--save-keep-last 2: deleted the checkpoints of iteration(s) 2 in CKPT` "
     "(the log)",
     "the 2 newest complete checkpoints; never the tracker's, nor a newer one being written",
     "tests/training/test_checkpoint_faults.py::test_full_disk_retention_and_a_cut_checkpoint"),
    ("train", "a cut checkpoint with `--load-fallback`", "`... truncated: N of M bytes (...): loading iteration 4 "
     "instead, the newest complete checkpoint in CKPT (--load-fallback)` (the log)",
     "training goes on from iteration 5; the cut checkpoint is saved again, whole",
     "tests/training/test_checkpoint_faults.py::test_full_disk_retention_and_a_cut_checkpoint"),
    ("train", "a second run into a --save that a live run writes", "`error: --save CKPT is being written by another "
     "run (host H, pid P, started T; its lock: CKPT/.sed_megatron.lock): stop it or choose another --save ...`, exit 2",
     "nothing of the second run; the live run's lock untouched",
     "tests/training/test_checkpoint_faults.py::test_a_live_run_keeps_its_save_and_a_dead_one_leaves_it"),
    ("train", "a --save whose run was killed (its lock left behind)", "`took over the lock CKPT/.sed_megatron.lock of "
     "a run that is gone (host H, pid P, started T; pid P is not running)` (the log)",
     "the lock is the new run's while it runs, removed at its end",
     "tests/training/test_checkpoint_faults.py::test_a_live_run_keeps_its_save_and_a_dead_one_leaves_it"),
    ("train", "a lock of a run on another host whose heartbeat stopped (or the same torchrun job restarted)",
     "refused while its heartbeat is fresh; taken over (`... its heartbeat stopped N s ago`) after 5 minutes; "
     "the same run id: kept", "the lock is the new run's",
     "tests/training/test_checkpoint_checks.py::test_the_lock_refuses_a_live_run_and_takes_over_a_dead_one"),
    ("train", "kill -9 of a worker between two saves (`launch/train.sh`, TP=2)", "torchrun restarts the workers: "
     "`restart 1: iteration 5 failed (killed by a signal (no error recorded)); resuming from iteration 3 in CKPT, 1 "
     "finished iteration(s) lost` (the log)", "the final checkpoint equals an uninterrupted run's, bit for bit "
     "(optimizer state too); metrics.jsonl: one curve, `restart` in the first record after it",
     "tests/training/test_restart.py::test_kill_9_of_a_worker_restarts_and_resumes_bit_identical"),
    ("train", "a rank frozen (SIGSTOP), two torchrun agents (`NNODES=2`)", "`error: rank 0 stopped making progress "
     "after iteration 4 (no heartbeat for 12 s); --hang-timeout-minutes 0.2; ending the job ...`, exit 6; then the "
     "restart above", "as above",
     "tests/training/test_restart.py::test_sigstop_of_a_rank_on_two_agents_ends_the_attempt_and_restarts"),
    ("train", "a fault at the same iteration in every attempt", "`error: no progress: iteration N failed in the last "
     "two attempts (first error: InjectedFault: ...); not restarting again (the newest checkpoint in CKPT: iteration "
     "M)`, exit 5, at once in each later attempt", "the checkpoints as they were; `CKPT/.run/restarts.json` lists "
     "the attempts",
     "tests/training/test_unattended.py::test_restarts_are_accounted_and_stop_without_progress"),
]


def _fixtures(root):
    """Shared inputs the cases name: {tok}, {tok_plain}, {hf}, {hf_missing_shard}."""
    from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

    paths = {"tok": os.path.join(root, "tok"), "tok_plain": os.path.join(root, "tok_plain"),
             "hf": os.path.join(root, "hf"), "hf_missing_shard": os.path.join(root, "hf_sharded")}
    words = ["hello", "hi", "there"]
    make_tokenizer(paths["tok"], words)
    make_tokenizer(paths["tok_plain"], words, chat_template=False)
    model = tiny_hf_model("llama_gqa_tied")
    model.save_pretrained(paths["hf"])
    model.save_pretrained(paths["hf_missing_shard"], max_shard_size="50KB")
    shards = sorted(f for f in os.listdir(paths["hf_missing_shard"]) if f.endswith(".safetensors"))
    os.remove(os.path.join(paths["hf_missing_shard"], shards[-1]))
    paths.update(_corrupt_inputs(root))
    return paths


def _corrupt_inputs(root):
    """{ckpt_cut} (iteration 4's shard cut short, 2 complete), {ckpt_unfinished} (4 without its
    .metadata), {ckpt_no_shard} (4's shard gone), {ds_cut} (a .bin shorter than its .idx says),
    {ds_mismatch} (loss masks of another dataset): torch_dist checkpoints written by torch's own
    writer, indexed datasets by Megatron's builder."""
    import numpy
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def checkpoint(save, iteration):
        path = os.path.join(save, f"iter_{iteration:07d}")
        state = {"w": torch.arange(256, dtype=torch.float32)}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, single_file_per_rank=True), no_dist=True)
        with open(os.path.join(path, "metadata.json"), "w") as f:
            json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
        return path

    def indexed(prefix, lengths, mask_lengths):
        for path, dtype, sizes in ((prefix, torch.int32, lengths), (prefix + "_loss_mask", torch.uint8, mask_lengths)):
            builder = IndexedDatasetBuilder(path + ".bin", dtype=numpy.int32 if dtype == torch.int32 else numpy.uint8)
            for n in sizes:
                builder.add_item(torch.ones(n, dtype=dtype))
                builder.end_document()
            builder.finalize(path + ".idx")

    paths = {name: os.path.join(root, name) for name in ("ckpt_cut", "ckpt_unfinished", "ckpt_no_shard", "ds_cut",
                                                         "ds_mismatch")}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "assuming the intent is to save in a single process"
        checkpoint(paths["ckpt_cut"], 2)
        shard = os.path.join(checkpoint(paths["ckpt_cut"], 4), "__0_0.distcp")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        os.remove(os.path.join(checkpoint(paths["ckpt_unfinished"], 4), ".metadata"))
        os.remove(os.path.join(checkpoint(paths["ckpt_no_shard"], 4), "__0_0.distcp"))
    indexed(paths["ds_cut"], [5, 7, 9], [5, 7, 9])
    with open(paths["ds_cut"] + ".bin", "r+b") as f:
        f.truncate(60)
    indexed(paths["ds_mismatch"], [5, 7, 9], [5, 8, 9])
    return paths


def _fill(text, values):
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_case(case, scratch, fixtures):
    """(exit code, the stderr line, what is left at the output)."""
    os.makedirs(scratch)
    for rel, content in case.files.items():
        path = os.path.join(scratch, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    values = {**fixtures, "tmp": scratch}
    argv = [_fill(a, values) for a in case.argv]
    module = importlib.import_module(ENTRY[case.entry][0])
    env = {"RANK": "0", "WORLD_SIZE": "1", **case.env}  # as under torchrun: no self-started ranks
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    stderr, stdout = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = module.main(argv) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except PassedStartUp:
        code, stderr = 0, io.StringIO("(passed every start-up check)")
    finally:
        _forget_megatron_args()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    seen = lines[-1] if lines else ""
    left = "-"
    if case.output is not None:
        output = _fill(case.output, values)
        left = (f"nothing at `{os.path.relpath(output, scratch)}`" if not os.path.exists(output)
                else f"`{os.path.relpath(output, scratch)}` exists")
    return code, seen, left, lines


class PassedStartUp(Exception):
    """A case that got past every start-up check: it would have started training."""


def _stop_before_work():
    """Training and calibration stop right after their start-up checks instead of running."""
    import megatron.training

    import sed_megatron.training.calibrate as calibrate

    def stop(*args, **kwargs):
        raise PassedStartUp()

    megatron.training.pretrain = stop
    calibrate.calibrate_from_args = stop


def _forget_megatron_args():
    """A case that passed the start-up checks left Megatron's global args set; the next needs none."""
    from megatron.training.global_vars import unset_global_variables

    unset_global_variables()


def generate():
    """The Markdown of docs/RELIABILITY.md, and a list of problems (cases that did not behave)."""
    from sed_megatron.runtime import prepare

    prepare(training=True)  # the CPU layer once, as every entry point would
    _stop_before_work()
    problems, rows = [], []
    root = tempfile.mkdtemp(prefix="reliability-")
    try:
        fixtures = _fixtures(root)
        for number, case in enumerate(cases(), 1):
            code, seen, left, lines = run_case(case, os.path.join(root, f"case{number}"), fixtures)
            prog_line = re.sub(r"^\S+: error: ", "", seen)
            if code != case.code or not re.search(case.expect, prog_line) or len(lines) != 1:
                problems.append(f"{case.entry}: {case.what}: exit {code}, {len(lines)} stderr line(s), last: {seen!r}")
            shown = re.sub(re.escape(root) + r"/(case\d+|\w+)", lambda m: "$TMP" if m.group(1).startswith("case")
                           else m.group(1).upper(), seen)
            nproc = case.env.get("WORLD_SIZE", "1")
            command = " ".join([ENTRY[case.entry][1].replace("{nproc}", nproc), *case.argv]).replace("{tmp}", "$TMP")
            command = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), command)
            env = " ".join(f"{k}={v}" for k, v in case.env.items() if k != "WORLD_SIZE")
            rows.append(f"| {number} | {case.entry} | {case.what} | `{(env + ' ') if env else ''}{command}` | "
                        f"`{shown}` | {code} | {left} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for entry, what, seen, left, test in FAULTS:
        path, _, name = test.partition("::")
        module = importlib.import_module(path[:-3].replace("/", "."))
        if not callable(getattr(module, name, None)):
            problems.append(f"{test}: no such test")
    start = len(rows) + 1
    fault_rows = [f"| {start + i} | {entry} | {what} | `pytest {test}` | {seen} | - | {left} |"
                  for i, (entry, what, seen, left, test) in enumerate(FAULTS)]
    header = (
        "# Reliability: every bad input and fault tried\n\n"
        "Generated by `python -m tests.reliability --write docs/RELIABILITY.md`; `tests/test_reliability.py` "
        "runs every case again and fails when this file is not what they do. Bad inputs (rows 1-"
        f"{len(rows)}) run each entry point's `main`; `$TMP` is the case's scratch directory, HF / TOK "
        "fixtures are a tiny Llama and a word-level tokenizer. Every one ends in one line on stderr, "
        "`<tool>: error: <what is wrong, naming the file, line, flag or field>`, and the exit code shown. "
        "Faults (the other rows) are run by the test named.\n\n"
        "| # | entry point | bad input or fault | command | what the user sees | exit | left on disk |\n"
        "|---|---|---|---|---|---:|---|\n")
    return header + "\n".join(rows + fault_rows) + "\n", problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="write the Markdown here (docs/RELIABILITY.md)")
    parser.add_argument("--out", help="write the Markdown here and a JSON list of problems beside it (.json)")
    options = parser.parse_args(argv)
    text, problems = generate()
    for path in filter(None, (options.write, options.out)):
        with open(path, "w") as f:
            f.write(text)
    if options.out:
        with open(options.out + ".json", "w") as f:
            json.dump(problems, f, indent=1)
    for problem in problems:
        print(f"reliability: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
