"""Check that a Hugging Face directory has what the RL frameworks read from it, before a run starts.

    python examples/rl/check_export.py hf/qwen25-math-7b-sed --for verl

Prints what it found, one item a line, and exits 0; exits 2 with one line naming the missing
piece otherwise. What is read, and by whom:
  config.json `architectures`   verl picks the model class from architectures[0]
                                (verl/utils/model.py get_hf_auto_model_class; its model_merger
                                too), vLLM its implementation; TRL when given a path
                                (examples/rl/grpo_trl.py loads the model itself, by model_type)
  the chat template             the prompts are chat messages: verl and TRL render them with it
  the tokenizer's eos           generation stops there; verl and TRL also pad with it when the
                                tokenizer has no pad token
  generation_config.json        its eos_token_id list: further stop ids (vLLM; TRL >= 1.15)
The token that closes an assistant turn in the chat template must be one of those stop ids,
else every response runs to the length limit.
"""

import argparse
import json
import os
import sys

PROG = "check_export.py"


def turn_end_token(tokenizer):
    """The first special token the chat template puts after an assistant message's text, or None."""
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if "pong" not in text:
        return None
    after = tokenizer(text[text.rindex("pong") + len("pong"):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in after if i in special), None)


def check(hf_dir, framework):
    """(findings, problem or None) for the directory as `framework` ("verl" or "trl") reads it."""
    from transformers import AutoTokenizer, GenerationConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        return [], f"{path}: missing (not a Hugging Face model directory)"
    with open(path) as f:
        config = json.load(f)
    found = [f"model_type {config.get('model_type')}, architectures {config.get('architectures')}"]
    if not config.get("architectures") and framework == "verl":
        return found, (f"{path}: no `architectures` (verl and vLLM choose the model class from it; e.g. "
                       f"[\"LlamaForCausalLM\"] for model_type llama)")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if not getattr(tokenizer, "chat_template", None):
        return found, f"{hf_dir}: the tokenizer has no chat template (export with --hf-template from the instruct model)"
    if tokenizer.eos_token_id is None:
        return found, f"{hf_dir}: the tokenizer has no eos token"
    stop_ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
        stop_ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        found.append(f"generation_config.json eos_token_id {eos}")
    except OSError:
        found.append("no generation_config.json: generation stops at the tokenizer's eos only")
    pad = tokenizer.pad_token if tokenizer.pad_token is not None else f"none (the eos, {tokenizer.eos_token!r}, pads)"
    found.append(f"tokenizer eos {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), pad {pad}")
    found.append(f"stop ids {sorted(stop_ids)} = {tokenizer.convert_ids_to_tokens(sorted(stop_ids))}")
    end = turn_end_token(tokenizer)
    if end is None:
        found.append("the chat template ends an assistant turn without a special token: cannot check the stop ids")
    elif end not in stop_ids:
        name = tokenizer.convert_ids_to_tokens(end)
        return found, (f"{hf_dir}: the chat template ends an assistant turn with {name!r} ({end}), which is not a stop "
                       f"id: add it to generation_config.json's eos_token_id")
    else:
        found.append(f"assistant turns end with {tokenizer.convert_ids_to_tokens(end)!r}: a stop id")
    return found, None


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir")
    parser.add_argument("--for", dest="framework", choices=("verl", "trl"), default="verl")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        found, problem = check(options.hf_dir, options.framework)
    except (OSError, ValueError) as err:
        found, problem = [], f"{options.hf_dir}: {err}"
    for line in found:
        print(f"{PROG}: {line}")
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
