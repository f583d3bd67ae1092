"""Tiny Hugging Face artefacts built locally (nothing is downloaded): a word-level tokenizer."""

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
