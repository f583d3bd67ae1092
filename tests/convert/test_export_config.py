"""The exported config.json is the template's field by field (but for EXPORT_CHANGES and the
architecture the family computes), and the directory has what serving and RL frameworks read."""

import json

from sed_megatron.convert.hf_files import ARCHITECTURE_KEYS, EXPORT_CHANGES
from sed_megatron.testing.tiny_hf import make_tokenizer, tiny_hf_model

from .common import to_hf, to_mcore


def read(path):
    with open(path) as f:
        return json.load(f)


def test_export_keeps_the_template_and_writes_what_frameworks_read(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "source"
    tokenizer = make_tokenizer(str(source), ["hello", "hi"])
    tokenizer.pad_token = tokenizer.eos_token  # pad == EOS, as many instruct models ship
    tokenizer.save_pretrained(source)
    model = tiny_hf_model("llama_gqa_untied", vocab_size=len(tokenizer))
    model.config.unk_token_id = tokenizer.unk_token_id  # fields the family does not compute
    model.config.initializer_range = 0.05
    model.config.pad_token_id = tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(source)
    (source / "generation_config.json").unlink()  # a template without one
    to_mcore(source, tmp_path / "ckpt")
    done = to_hf(tmp_path / "ckpt", tmp_path / "out", hf_template=str(source))

    template, exported = read(source / "config.json"), read(tmp_path / "out" / "config.json")
    changed = {k for k in set(template) | set(exported) if template.get(k) != exported.get(k)}
    assert changed <= set(EXPORT_CHANGES), changed - set(EXPORT_CHANGES)
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["unk_token_id"] == tokenizer.unk_token_id
    assert exported["initializer_range"] == 0.05
    assert all(exported[k] == template[k] for k in ARCHITECTURE_KEYS if k in template and k != "architectures")

    # pad != EOS now, the chat template where transformers 4 and vLLM look, a generation config
    tok_config = read(tmp_path / "out" / "tokenizer_config.json")
    assert tok_config["pad_token"] == "<pad>" and "chat_template" in tok_config
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    assert exported["pad_token_id"] == pad_id != exported["eos_token_id"]
    generation = read(tmp_path / "out" / "generation_config.json")
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == pad_id
    assert len(done.notes) == 3, done.notes
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.pad_token == "<pad>" and loaded.chat_template
    assert AutoConfig.from_pretrained(tmp_path / "out").pad_token_id == pad_id
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")

    # Without a template: the family's whole config, and a generation config from its ids.
    bare = to_hf(tmp_path / "ckpt", tmp_path / "bare")
    config = read(tmp_path / "bare" / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "bare" / "generation_config.json").exists()
    assert bare.notes == ("generation_config.json written from config.json's special token ids",)
