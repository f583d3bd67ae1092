"""SFT data -> Megatron indexed dataset with assistant-only loss masks.

    python tools/preprocess_sft_data.py --input chats.jsonl --tokenizer HF_DIR --output-prefix data/sft --truncation skip
    python tools/preprocess_sft_data.py --input gsm8k.jsonl --prompt-key question --response-key answer \\
        --tokenizer HF_DIR --output-prefix data/gsm8k --seq-length 1024 --workers 8

Input (--input): a JSON-lines file, a parquet file, a directory of .jsonl / .parquet shards, a
dataset saved with `datasets` (DIR or DIR:SPLIT), or one in the local Hugging Face cache
(hf:NAME[:SPLIT], no network). Schemas (--schema, detected per row by default and stated):
messages ({"role": system|user|assistant|tool, "content": ...}; every assistant turn carries
loss), sharegpt (`conversations` with from/value: human, gpt, system, ...), prompt_response
(--prompt-key / --response-key), alpaca (instruction / input / output); tokenized with the
tokenizer's chat template. Reasoning (--reasoning, docs/DATA.md): `<think>...</think>` in the
content or a `reasoning_content` / `reasoning` / `thinking` field. Writes PREFIX.bin/.idx (tokens) and
PREFIX_loss_mask.bin/.idx. Bad input stops with one line naming file and line (or, with
--skip-bad, is counted and reported); a failure leaves no file at PREFIX. The rows are tokenized
in units of 1024 (never across files) by --workers processes, each unit into PREFIX.parts/, merged
at the end; a killed run leaves PREFIX.parts/ and the same command again resumes it (finished
units whose input and settings are unchanged are kept). By default samples of
up to 32,000 tokens are kept, as the paper's data were. At the end one line on stderr gives the
samples kept, their length distribution (p50 / p90 / max) and how many were dropped (per
reason below it); the last line on stdout is the same summary as JSON.
"""

import argparse
import json
import sys

from sed_megatron.data.reasoning import DEFAULT_MODE as DEFAULT_REASONING
from sed_megatron.data.reasoning import MODES as REASONING_MODES
from sed_megatron.data.schemas import SCHEMAS
from sed_megatron.data.sft_preprocess import (
    PAPER_MAX_SAMPLE_TOKENS,
    TRUNCATION,
    PreprocessConfig,
    preprocess,
    schema_line,
    skip_report,
    summary_line,
)
from sed_megatron.utils import fail, help_sections

PROG = "preprocess_sft_data.py"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, **help_sections(__doc__),
                                     usage="%(prog)s --input FILE --tokenizer DIR --output-prefix PREFIX [options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="a .jsonl / .parquet file, a shard directory, a saved dataset (DIR[:SPLIT]) or "
                             "hf:NAME[:SPLIT]")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face tokenizer directory")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin/.idx and PREFIX_loss_mask.bin/.idx")
    parser.add_argument("--seq-length", type=int, default=PAPER_MAX_SAMPLE_TOKENS - 1, metavar="N",
                        help="longest sample kept: seq_length + 1 tokens (default %(default)s: samples of up to "
                             f"{PAPER_MAX_SAMPLE_TOKENS} tokens, the paper's; 0: no limit)")
    parser.add_argument("--truncation", choices=TRUNCATION, default="error",
                        help="longer samples: error (default), skip (counted), truncate (cut the end)")
    parser.add_argument("--schema", choices=SCHEMAS, default="auto",
                        help="auto (default): per row, the first whose field it has")
    parser.add_argument("--messages-key", default="messages")
    parser.add_argument("--conversations-key", default="conversations")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    parser.add_argument("--system-key", default=None)
    parser.add_argument("--reasoning", choices=REASONING_MODES, default=DEFAULT_REASONING,
                        help="assistant thinking (<think>...</think> or a reasoning_content field): inline (default: "
                             "as <think> text), field (as reasoning_content, Qwen3) or drop")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="prompt/response: plain prompt + response + EOS instead of the chat template")
    parser.add_argument("--skip-bad", action="store_true", help="count and report bad samples instead of failing")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help="the model's vocabulary size (default: the tokenizer's)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes; the output is the same for any N")
    parser.add_argument("--no-resume", action="store_true", help="start over: drop PREFIX.parts/ of a killed run")
    parser.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = PreprocessConfig(
            input=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
            seq_length=args.seq_length or None,
            schema=args.schema, messages_key=args.messages_key, conversations_key=args.conversations_key,
            prompt_key=args.prompt_key,
            response_key=args.response_key, system_key=args.system_key, use_chat_template=not args.no_chat_template,
            reasoning=args.reasoning,
            truncation=args.truncation, skip_bad=args.skip_bad, vocab_size=args.vocab_size, workers=args.workers,
        )
        summary = preprocess(cfg, progress=not args.quiet and sys.stderr.isatty(), resume=not args.no_resume,
                             log=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
    except ValueError as err:
        fail(err, PROG)
    print(f"{PROG}: {schema_line(summary, args.schema)}", file=sys.stderr)
    print(f"{PROG}: {summary_line(summary)}", file=sys.stderr)
    for line in skip_report(summary):
        print(f"{PROG}:   {line}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("samples", "tokens", "loss_tokens", "skipped", "lengths")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
