"""The registry: every family by model_type, clear errors, and a family added without touching shared code."""

import dataclasses

import pytest

from sed_megatron.models import family_for, register, registry, supported_model_types


def test_supported_families():
    assert supported_model_types() == ("llama", "mistral", "qwen2")
    assert {t: family_for(t).architecture for t in supported_model_types()} == {
        "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def test_unsupported_model_type_lists_the_supported():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"):
        family_for("gpt2")


def test_a_model_type_has_one_family():
    impostor = dataclasses.replace(family_for("llama"), name="impostor")
    with pytest.raises(ValueError, match="model_type 'llama' is already registered by family 'llama'"):
        register(impostor)
    assert register(family_for("llama")) is family_for("llama")  # registering the same family again is harmless


def test_a_new_family_is_a_registration(monkeypatch):
    """What a new folder does: register a Family (here Llama's parts under another model_type)."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # undone after the test
    toy = register(dataclasses.replace(family_for("llama"), name="toy", model_types=("toy",),
                                       architecture="ToyForCausalLM"))
    assert family_for("toy") is toy and "toy" in supported_model_types()
