"""Llama's name map: Hugging Face LlamaForCausalLM tensors <-> Megatron GPTModel tensors.

In groups, so that a family built on Llama replaces or extends one group (Qwen3 adds its
query/key norms to the attention, an MoE family swaps the MLP for experts). Transformer
Engine layers fuse the layer norm into the next linear layer (`linear_qkv.layer_norm_weight`),
the local layers keep it apart (`input_layernorm.weight`): both are named here.
"""

from ..mapping import QKV, Direct, GateUp, VocabRows

HF = "model.layers.{layer}."
MC = "decoder.layers.{layer}."


def embedding_mappings(cfg):
    """Input embedding, final norm and (untied) output layer."""
    rows = [VocabRows("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Direct("decoder.final_layernorm.weight", "model.norm.weight")]
    if not cfg.tied_embeddings:
        rows.append(VocabRows("output_layer.weight", "lm_head.weight"))
    return rows


def attention_mappings(cfg):
    """Fused per-group QKV (and its bias), the output projection, the norm before attention."""
    te = cfg.transformer_impl == "transformer_engine"
    qkv = [HF + f"self_attn.{p}_proj.weight" for p in "qkv"]
    rows = [QKV(MC + "self_attention.linear_qkv.weight", *qkv),
            Direct(MC + "self_attention.linear_proj.weight", HF + "self_attn.o_proj.weight"),
            Direct(MC + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"),
                   HF + "input_layernorm.weight")]
    if cfg.qkv_bias:
        rows.append(QKV(MC + "self_attention.linear_qkv.bias", *(n.replace(".weight", ".bias") for n in qkv)))
    return rows


def mlp_mappings(cfg):
    """SwiGLU's fused gate/up, the down projection, the norm before the MLP."""
    te = cfg.transformer_impl == "transformer_engine"
    return [GateUp(MC + "mlp.linear_fc1.weight", HF + "mlp.gate_proj.weight", HF + "mlp.up_proj.weight"),
            Direct(MC + "mlp.linear_fc2.weight", HF + "mlp.down_proj.weight"),
            Direct(MC + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"),
                   HF + "post_attention_layernorm.weight")]


def mappings(cfg):
    """Every mapping of a Llama model (one entry per layer tensor, `{layer}` for the layer index)."""
    return embedding_mappings(cfg) + attention_mappings(cfg) + mlp_mappings(cfg)
