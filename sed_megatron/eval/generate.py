"""Sampling several responses per prompt from a Hugging Face checkpoint: transformers or vLLM."""

import contextlib
import importlib.util
import sys

BACKENDS = ("auto", "transformers", "vllm")


def render(tokenizer, prompt, use_chat_template):
    """The text the model continues: the chat template's rendering when there is one (or the
    prompt is a `messages` list), else the prompt as it is."""
    if isinstance(prompt, list) or (use_chat_template and getattr(tokenizer, "chat_template", None)):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def resolve_backend(backend):
    """auto: vLLM when it is installed and a GPU is present, else transformers."""
    if backend != "auto":
        return backend
    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"


def _show_progress(quiet):
    """Progress bars only on a terminal (as every bar of the project), and not with --quiet."""
    return not quiet and sys.stderr.isatty()


def _progress(total, desc, quiet):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" prompts", file=sys.stderr, disable=not _show_progress(quiet))


@contextlib.contextmanager
def transformers_progress(enabled):
    """transformers' own bars ("Loading weights", downloads) off inside the block unless enabled;
    the global setting is restored after it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def load_model(hf_dir, device, quiet=False):
    """(tokenizer, model in eval mode on device): bf16 on a GPU, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_progress(_show_progress(quiet)):
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return tokenizer, model.to(device).eval()


def generate_transformers(hf_dir, texts, *, num_samples, max_new_tokens, temperature, top_p, seed, batch_prompts=1,
                          quiet=False):
    """[[num_samples strings] per text]; batch_prompts prompts per generate call, left-padded."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = load_model(hf_dir, device, quiet)
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # generation continues every prompt of a batch from its last token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    with _progress(len(texts), "sampling", quiet) as progress:
        for start in range(0, len(texts), batch_prompts):
            chunk = texts[start:start + batch_prompts]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                generated = model.generate(
                    **batch, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples, pad_token_id=pad_id,
                )
            decoded = tokenizer.batch_decode(generated[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            outputs += [decoded[i:i + num_samples] for i in range(0, len(decoded), num_samples)]
            progress.update(len(chunk))
    return outputs


def generate_vllm(hf_dir, texts, *, num_samples, max_new_tokens, temperature, top_p, seed, **_):
    from vllm import LLM, SamplingParams

    llm = LLM(model=hf_dir, seed=seed)
    params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
    return [[o.text for o in result.outputs] for result in llm.generate(texts, params)]


GENERATORS = {"transformers": generate_transformers, "vllm": generate_vllm}
