"""ModelConfig: validation that names the field, the Megatron-LM flags both ways, model files of
earlier converters, and the training provider's translation of Megatron's args."""

import dataclasses

import pytest
import yaml

from sed_megatron.models import ModelConfig, family_for
from sed_megatron.testing.tiny_hf import TINY_VARIANTS, tiny_hf_config

from ..distributed import run_distributed

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
            kv_channels=16, vocab_size=120, padded_vocab_size=1024)


@pytest.mark.parametrize("change,message", [
    ({"num_layers": 0}, "ModelConfig.num_layers: expected a positive integer, got 0"),
    ({"hidden_size": 64.0}, "ModelConfig.hidden_size: expected a positive integer"),
    ({"num_query_groups": 3}, "ModelConfig.num_query_groups: 3 does not divide num_attention_heads 4"),
    ({"padded_vocab_size": 100}, "ModelConfig.padded_vocab_size: 100 is smaller than vocab_size 120"),
    ({"normalization": "rmsnorm"}, "ModelConfig.normalization: 'rmsnorm' is not one of RMSNorm, LayerNorm"),
    ({"transformer_impl": "te"}, "ModelConfig.transformer_impl: 'te' is not one of local, transformer_engine"),
    ({"position_embedding_type": "alibi"}, "ModelConfig.position_embedding_type"),
    ({"norm_epsilon": 0.0}, "ModelConfig.norm_epsilon"),
    ({"rotary_percent": 1.5}, "ModelConfig.rotary_percent"),
    ({"rope_scaling_factor": -1.0}, "ModelConfig.rope_scaling_factor"),
    ({"num_experts": 0}, "ModelConfig.num_experts"),
    ({"num_experts": 4, "moe_router_topk": 5}, "ModelConfig.moe_router_topk: 5 is not in \\[1, num_experts 4\\]"),
])
def test_validation_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **change})


def test_frozen_and_replace_validates():
    cfg = ModelConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    assert cfg.replace(num_layers=3).num_layers == 3
    with pytest.raises(ValueError, match="ModelConfig.num_query_groups"):
        cfg.replace(num_query_groups=3)


def test_every_field_is_documented():
    import ast
    import inspect

    import sed_megatron.models.config as module

    body = next(node for node in ast.parse(inspect.getsource(module)).body
                if isinstance(node, ast.ClassDef) and node.name == "ModelConfig").body
    documented = {a.target.id for a, doc in zip(body, body[1:])
                  if isinstance(a, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}
    assert documented == {f.name for f in dataclasses.fields(ModelConfig)}


MOE = ModelConfig(**{**BASE, "num_experts": 8, "moe_ffn_hidden_size": 32, "moe_router_topk": 2, "qk_layernorm": True,
                     "qkv_bias": False, "rotary_base": 1000000, "tied_embeddings": False})


@pytest.mark.parametrize("variant", list(TINY_VARIANTS) + ["moe_qk_norm"])
def test_megatron_flags_round_trip(variant):
    if variant == "moe_qk_norm":
        cfg = MOE
    else:
        config = tiny_hf_config(variant)
        cfg = family_for(config.model_type).config_from_hf(config)
    flags = cfg.to_megatron_flags()
    assert ModelConfig.from_megatron_flags(flags, cfg.padded_vocab_size, model_type=cfg.model_type) == cfg
    assert "padded_vocab_size" not in flags and "transformer_impl" not in flags  # not Megatron flags here


# What tools/convert_hf_to_mcore.py wrote before ModelConfig existed (sed_megatron_model.yaml).
EARLIER_MODEL_FILE = """\
model_type: llama
model:
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 96
  num_attention_heads: 4
  group_query_attention: true
  num_query_groups: 2
  kv_channels: 16
  max_position_embeddings: 16384
  vocab_size: 120
  normalization: RMSNorm
  norm_epsilon: 1.0e-05
  swiglu: true
  disable_bias_linear: true
  add_qkv_bias: false
  position_embedding_type: rope
  rotary_base: 500000
  rotary_percent: 1.0
  untie_embeddings_and_output_weights: false
  attention_dropout: 0.0
  hidden_dropout: 0.0
  use_rope_scaling: true
  rope_scaling_factor: 32.0
padded_vocab_size: 1024
dtype: float32
"""


def test_reads_and_writes_the_earlier_model_file(tmp_path):
    from sed_megatron.models.model_file import MODEL_FILE, model_config_from_file, write_model_file

    (tmp_path / MODEL_FILE).write_text(EARLIER_MODEL_FILE)
    cfg, dtype = model_config_from_file(str(tmp_path))
    assert dtype == "float32"
    assert cfg == family_for("llama").config_from_hf(tiny_hf_config("llama_rope_scaling"))
    out = tmp_path / "again"
    out.mkdir()
    write_model_file(str(out), cfg, dtype)
    assert yaml.safe_load((out / MODEL_FILE).read_text()) == yaml.safe_load(EARLIER_MODEL_FILE)


def test_model_file_errors_name_the_file_and_key(tmp_path):
    from sed_megatron.models.model_file import MODEL_FILE, model_config_from_file

    path = tmp_path / MODEL_FILE
    path.write_text(EARLIER_MODEL_FILE.replace("  swiglu: true", "  swiglu: true\n  seq_length: 64"))
    with pytest.raises(ValueError, match=f"{MODEL_FILE}: model.seq_length: not an architecture flag"):
        model_config_from_file(str(tmp_path))
    path.write_text(EARLIER_MODEL_FILE.replace("  num_layers: 2\n", ""))
    with pytest.raises(ValueError, match=f"{MODEL_FILE}: model.num_layers: missing"):
        model_config_from_file(str(tmp_path))
    path.write_text(EARLIER_MODEL_FILE.replace("num_query_groups: 2", "num_query_groups: 3"))
    with pytest.raises(ValueError, match=f"{MODEL_FILE}: model: ModelConfig.num_query_groups"):
        model_config_from_file(str(tmp_path))
    assert model_config_from_file(str(tmp_path / "absent")) is None


def _through_megatron_args(flags_and_configs):
    """In a process of the session's one-rank set (tests/distributed.py): each config's flags through Megatron-LM's parser and validation, then
    the training provider's ModelConfig and Megatron's TransformerConfig of those args."""
    import argparse

    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from sed_megatron.models.gpt import check_agrees
    from sed_megatron.training.arguments import yaml_flags_to_argv
    from sed_megatron.world import model_config_from_args

    results = []
    for flags, cfg in flags_and_configs:
        parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        argv = yaml_flags_to_argv(flags, parser, "flags") + [
            "--seq-length", "32", "--micro-batch-size", "1", "--transformer-impl", "local", "--tokenizer-type",
            "NullTokenizer", "--use-cpu-initialization", "--no-persist-layer-norm",
            "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion"]
        args = parser.parse_args(argv)
        args.rank, args.world_size = 0, 1
        validate_args(args, {})
        args.padded_vocab_size = cfg.padded_vocab_size
        from_args = model_config_from_args(args)
        check_agrees(cfg, core_transformer_config_from_args(args))  # ValueError naming a field otherwise
        results.append(from_args)
    return results


def test_training_reads_the_same_architecture_from_megatron_args():
    configs = [family_for(c.model_type).config_from_hf(c) for c in map(tiny_hf_config, TINY_VARIANTS)]
    configs = [dataclasses.replace(c, model_type=None) for c in configs] + [MOE]
    got = run_distributed(_through_megatron_args, world_size=1, args=([(c.to_megatron_flags(), c) for c in configs],))
    assert got == configs


def test_the_table_covers_every_field_and_names_megatrons_attributes():
    """megatron_fields.FIELDS holds every ModelConfig field in order (a field without a row would
    travel nowhere), and the args attributes it names are the ones Megatron's parser stores."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from sed_megatron.models import megatron_fields

    assert [field.name for field in megatron_fields.FIELDS] == [f.name for f in dataclasses.fields(ModelConfig)]
    actions = {option[2:].replace("-", "_"): action
               for action in add_megatron_arguments(argparse.ArgumentParser())._actions
               for option in action.option_strings if option.startswith("--")}
    for key in megatron_fields.FLAG_KEYS:
        assert key in actions, key  # every model-file key is a flag of Megatron's
        expected = megatron_fields.ARGS_ATTRIBUTES.get(key, key)
        assert actions[key].dest == expected, (key, actions[key].dest)
    assert isinstance(actions["disable_bias_linear"], argparse._StoreFalseAction)  # stored negated, as read
