"""The Hugging Face side of an export: config.json, generation_config.json and the tokenizer files.

The exported config.json is the template's (the model the checkpoint came from), field by
field, except the keys the model family computes from the checkpoint's architecture and those
listed in EXPORT_CHANGES. What serving and RL frameworks read from the directory is made
explicit: vLLM and SGLang pick the model class from `architectures`; generation stops at
generation_config.json's eos ids; transformers 4 and vLLM read the chat template from
tokenizer_config.json; trainers that mask padding out of the labels never learn EOS when the
pad token is EOS.
"""

import json
import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")

ARCHITECTURE_KEYS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
    "decoder_sparse_step", "mlp_only_layers",
)
"""Keys the families compute from the checkpoint's architecture (those the family's config has)."""

EXPORT_CHANGES = {
    "dtype": "the exported weights' dtype (torch_dtype in older files)",
    "torch_dtype": "the exported weights' dtype",
    "transformers_version": "the installed transformers",
    "rope_parameters": "transformers 5's RoPE form, written beside the template's rope_theta / rope_scaling",
    "rope_theta": "added for transformers 4 readers when the template has none",
    "rope_scaling": "added for transformers 4 readers when the template has none and RoPE is scaled",
    "pad_token_id": "only when the template's pad token is missing or EOS and the vocabulary has a reserved one",
}
"""Keys on which an exported config.json may differ from its template's, and why."""

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")
"""Reserved padding tokens, looked for in this order when the pad token is missing or EOS."""


def merged_config(template, computed):
    """The config.json dict: the template's, with the family's architecture keys and EXPORT_CHANGES
    (without a template: the family's whole config)."""
    out = dict(template) if template is not None else dict(computed)
    for key in ARCHITECTURE_KEYS:
        if key in computed:
            out[key] = computed[key]
    for key in ("dtype", "transformers_version"):
        out[key] = computed[key]
    out.pop("torch_dtype", None)
    rope = computed.get("rope_parameters")
    if rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def _token_ids(directory):
    """{token: id} of the tokenizer's added (special) tokens, from tokenizer.json."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return {}
    return {entry["content"]: entry["id"] for entry in _read_json(path).get("added_tokens", [])}


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def fix_tokenizer_files(directory, config):
    """Chat template into tokenizer_config.json; a reserved pad token when pad is missing or EOS.
    Edits config (pad_token_id) to match; returns one note per change."""
    notes = []
    tok_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(tok_path):
        return notes
    tok = _read_json(tok_path)
    jinja = os.path.join(directory, "chat_template.jinja")
    if "chat_template" not in tok and os.path.exists(jinja):
        with open(jinja) as f:
            tok["chat_template"] = f.read()
        notes.append("chat template also in tokenizer_config.json (transformers 4 and vLLM read it there)")
    eos, pad = _token_text(tok.get("eos_token")), _token_text(tok.get("pad_token"))
    if eos is not None and pad in (None, eos):
        ids = _token_ids(directory)
        choice = next((t for t in PAD_CANDIDATES if t in ids and t != eos), None)
        if choice is not None:
            tok["pad_token"] = choice
            config["pad_token_id"] = ids[choice]
            special = os.path.join(directory, "special_tokens_map.json")
            if os.path.exists(special):
                special_map = _read_json(special)
                special_map["pad_token"] = choice
                _write_json(special, special_map)
            notes.append(f"pad token {choice} (id {ids[choice]}) instead of {'EOS' if pad else 'none'}: trainers that "
                         f"mask padding out of the labels would otherwise never learn EOS")
    _write_json(tok_path, tok)
    return notes


def ensure_generation_config(directory, config):
    """generation_config.json: the template's, or one from config.json's special ids (generation
    stops at its eos_token_id)."""
    path = os.path.join(directory, "generation_config.json")
    if os.path.exists(path):
        generation = _read_json(path)
        if config.get("pad_token_id") is not None and generation.get("pad_token_id") != config["pad_token_id"]:
            generation["pad_token_id"] = config["pad_token_id"]
            _write_json(path, generation)
        return []
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config.get(key) is not None}
    generation["transformers_version"] = config["transformers_version"]
    _write_json(path, generation)
    return ["generation_config.json written from config.json's special token ids"]


def write_hf_files(directory, hf_config, template_dir=None):
    """config.json, generation_config.json and (from the template) the tokenizer files; the notes."""
    computed = hf_config.to_dict()
    template = None
    if template_dir:
        template = _read_json(os.path.join(template_dir, "config.json"))
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(template_dir, name)):
                shutil.copy(os.path.join(template_dir, name), os.path.join(directory, name))
    config = merged_config(template, computed)
    notes = fix_tokenizer_files(directory, config)
    notes += ensure_generation_config(directory, config)
    _write_json(os.path.join(directory, "config.json"), config)
    return notes
