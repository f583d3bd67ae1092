"""Tiny Hugging Face artefacts built locally (nothing is downloaded): a word-level tokenizer, random models."""

import os

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]


def make_tokenizer(directory, words, chat_template=True):
    """A whitespace word-level tokenizer over `words` (plus digits and specials), saved to directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in list(words) + [str(d) for d in range(10)]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[3:])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


TINY_VARIANTS = {
    # name -> (model_type, config overrides)
    "llama_gqa_untied": ("llama", {"tie_word_embeddings": False}),
    "llama_gqa_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_rope_scaling": ("llama", {"tie_word_embeddings": True, "max_position_embeddings": 16384,
                                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}}),
    "llama_mha": ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
    "qwen2_bias": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
}


def tiny_hf_config(variant, vocab_size=120):
    """A small transformers config of the given variant: 2 layers, 4 query heads (in 2 groups unless
    the variant says otherwise), head_dim 16 (not hidden / heads: an explicit head_dim must carry over)."""
    from transformers import AutoConfig

    model_type, overrides = TINY_VARIANTS[variant]
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, hidden_act="silu")
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_hf_model(variant, seed=0, vocab_size=120):
    """A randomly initialized fp32 transformers model of the variant (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(variant, vocab_size), dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm cannot go unnoticed
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
