"""Zoo cases: causal decoders (GPT-2 family, fused-qkv variants, LLaMA family, MoE)."""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import transformers as tf
from torch import nn

from .spec import (
    INPUT_SEED,
    TOKENS,
    Inputs,
    ZooCase,
    ids,
    seeded_randn,
    text_cli,
    text_inputs,
)

SPECIAL: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
GPT_LIKE: dict[str, Any] = {**SPECIAL, "vocab_size": 100, "n_positions": 64, "n_embd": 32,
                            "n_layer": 2, "n_head": 4}
LLAMA_LIKE: dict[str, Any] = {**SPECIAL, "vocab_size": 100, "max_position_embeddings": 64,
                              "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4}
CROSS_LEN = 5  # encoder states fed to GPT-2's cross-attention: a length unlike the 7 tokens


def _decoder(name: str, model_type: str, config: Any, model_class: Any, notes: str = "",
             **extra: Any) -> ZooCase:
    return ZooCase(name=name, model_type=model_type, family="decoder", config=config,
                   model_class=model_class, inputs=text_inputs, cli_inputs=text_cli(),
                   notes=notes, **extra)


def _gpt2_cross_inputs(model: nn.Module) -> Inputs:
    width = int(cast(Any, model).config.n_embd)
    return {"input_ids": ids(TOKENS),
            "encoder_hidden_states": seeded_randn(1, CROSS_LEN, width)}  # (1, S, E)


def _falcon(**extra: Any) -> Any:
    return partial(tf.FalconConfig, **LLAMA_LIKE, **extra)


GPT_CASES: list[ZooCase] = [
    _decoder("gpt2", "gpt2", partial(tf.GPT2Config, **GPT_LIKE), tf.GPT2Model,
             "Conv1D c_attn [E, 3E] blocked along dim 1"),
    ZooCase(name="gpt2_cross", model_type="gpt2", family="decoder",
            config=partial(tf.GPT2Config, **GPT_LIKE, add_cross_attention=True),
            model_class=tf.GPT2Model, inputs=_gpt2_cross_inputs,
            cli_inputs={**text_cli(), "encoder_seq_len": CROSS_LEN, "seed": INPUT_SEED},
            notes="add_cross_attention: crossattention.q_attn Conv1D [E, E] + "
                  "crossattention.c_attn Conv1D [E, 2E] (k|v) over encoder_hidden_states "
                  "(S=5); cross maps (1, H, 7, 5)"),
    _decoder("gpt_neo", "gpt_neo",
             partial(tf.GPTNeoConfig, **SPECIAL, vocab_size=100, max_position_embeddings=64,
                     hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     attention_types=[[["global", "local"], 1]], window_size=4),
             tf.GPTNeoModel,
             "layer 0 global, layer 1 local (window 4); attention.attention.q_proj/k_proj/"
             "v_proj (no bias) + out_proj; NO 1/sqrt(d) scaling; no attention interface",
             eager_only=True),
    _decoder("gptj", "gptj", partial(tf.GPTJConfig, **GPT_LIKE, rotary_dim=4), tf.GPTJModel,
             "separate q/k/v_proj (no bias); interleaved (rotate-every-two) rotary on the "
             "first 4 of d=8 dims"),
    _decoder("codegen", "codegen",
             partial(tf.CodeGenConfig, **GPT_LIKE, n_ctx=64, rotary_dim=4), tf.CodeGenModel,
             "qkv_proj [3E, E] packed as mp_num=4 blocks, each [q|v|k] of E/4 rows"),
    _decoder("gpt_bigcode_mqa", "gpt_bigcode",
             partial(tf.GPTBigCodeConfig, **GPT_LIKE, multi_query=True), tf.GPTBigCodeModel,
             "multi_query: Linear c_attn [E + 2d, E] = [Q | K (d) | V (d)], Hkv=1"),
    _decoder("gpt_bigcode_mha", "gpt_bigcode",
             partial(tf.GPTBigCodeConfig, **GPT_LIKE, multi_query=False), tf.GPTBigCodeModel,
             "Linear c_attn [3E, E] viewed per head as (H, 3d): interleaved, unlike nanoGPT"),
    _decoder("bloom", "bloom",
             partial(tf.BloomConfig, **SPECIAL, vocab_size=100, hidden_size=32, n_layer=2,
                     n_head=4),
             tf.BloomModel,
             "ALiBi; query_key_value rows (H, 3, d); q.k scaled by 1/sqrt(d) inside baddbmm "
             "(beta=1 on alibi); no attention interface", eager_only=True),
    _decoder("falcon_gqa", "falcon",
             _falcon(new_decoder_architecture=True, num_kv_heads=2, multi_query=True),
             tf.FalconModel,
             "new_decoder_architecture: query_key_value rows (Hkv=2, H/Hkv + 2, d) grouped; "
             "rotary; custom eager/sdpa code (no attention interface)"),
    _decoder("falcon_mqa", "falcon",
             _falcon(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
             tf.FalconModel,
             "Falcon-7B style: query_key_value [E + 2d, E] = [Q | K | V], ONE kv head although "
             "config.json says num_kv_heads=4; rotary"),
    _decoder("falcon_mha", "falcon",
             _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=True,
                     bias=True),
             tf.FalconModel, "multi_query=False: query_key_value rows (H, 3, d); rotary; bias"),
    _decoder("falcon_rw_alibi", "falcon",
             _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                     alibi=True, bias=True),
             tf.FalconModel,
             "Falcon-RW: ALiBi, rows (H, 3, d). transformers 5.24 eager adds ALiBi TWICE: "
             "softmax((qk + alibi)/sqrt(d) + mask) where the mask already holds "
             "alibi/sqrt(d); sdpa adds it once, so sdpa != eager (~3e-2 here)"),
    _decoder("mpt", "mpt",
             partial(tf.MptConfig, **SPECIAL, vocab_size=100, d_model=32, n_heads=4, n_layers=2,
                     expansion_ratio=2, max_seq_len=64,
                     attn_config={"alibi": True, "qk_ln": False, "clip_qkv": None}),
             tf.MptModel,
             "ALiBi; attn.Wqkv blocked [Q|K|V], no bias (no_bias=True); LayerNorms without "
             "bias; no attention interface", eager_only=True),
    _decoder("gpt_neox", "gpt_neox",
             partial(tf.GPTNeoXConfig, **LLAMA_LIKE), tf.GPTNeoXModel,
             "attention.query_key_value rows (H, 3, d); partial rotary (rotary_pct 0.25)"),
    _decoder("opt", "opt",
             partial(tf.OPTConfig, **{**SPECIAL, "pad_token_id": 1, "vocab_size": 100},
                     max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, ffn_dim=64),
             tf.OPTModel,
             "BART-like q/k/v/out_proj with bias; learned positions offset 2; q scaled by "
             "d**-0.5 before the attention function (called with scaling=1)"),
]

LLAMA_CASES: list[ZooCase] = [
    _decoder("llama_gqa", "llama",
             partial(tf.LlamaConfig, **LLAMA_LIKE, num_key_value_heads=2), tf.LlamaModel,
             "GQA H=4, Hkv=2, d=8; q_proj [32, 32], k/v_proj [16, 32]"),
    _decoder("mistral", "mistral",
             partial(tf.MistralConfig, **LLAMA_LIKE, num_key_value_heads=2, sliding_window=4),
             tf.MistralModel, "GQA 4/2 with sliding_window=4 (< 7 tokens: the mask bites)"),
    _decoder("qwen2", "qwen2",
             partial(tf.Qwen2Config, **LLAMA_LIKE, num_key_value_heads=2), tf.Qwen2Model,
             "GQA 4/2; q/k/v biases, o_proj without bias"),
    _decoder("qwen3", "qwen3",
             partial(tf.Qwen3Config, **LLAMA_LIKE, num_key_value_heads=2, head_dim=8),
             tf.Qwen3Model, "GQA 4/2; per-head RMSNorm q_norm/k_norm [d] before rotary"),
    _decoder("gemma", "gemma",
             partial(tf.GemmaConfig, **LLAMA_LIKE, num_key_value_heads=1, head_dim=8),
             tf.GemmaModel,
             "MQA (Hkv=1); RMSNorm scales by (1 + weight); embeddings times sqrt(E)"),
    _decoder("gemma2", "gemma2",
             partial(tf.Gemma2Config, **LLAMA_LIKE, num_key_value_heads=2, head_dim=8,
                     query_pre_attn_scalar=16, attn_logit_softcapping=10.0, sliding_window=4),
             tf.Gemma2Model,
             "GQA 4/2; scale query_pre_attn_scalar**-0.5 = 1/4 (not 1/sqrt(d)); logits "
             "soft-capped at 10 (tanh) before the softmax; layer 0 sliding window 4, layer 1 "
             "full", eager_only=True),
    _decoder("phi", "phi",
             partial(tf.PhiConfig, **LLAMA_LIKE), tf.PhiModel,
             "q/k/v_proj with bias + dense; partial rotary (factor 0.5); parallel attn/MLP"),
    _decoder("phi3", "phi3",
             partial(tf.Phi3Config, **LLAMA_LIKE, num_key_value_heads=2,
                     original_max_position_embeddings=64),
             tf.Phi3Model, "fused qkv_proj [(H + 2 Hkv) d, E] blocked [Q | K | V]; GQA 4/2"),
    _decoder("stablelm", "stablelm",
             partial(tf.StableLmConfig, **LLAMA_LIKE, num_key_value_heads=2, use_qkv_bias=True,
                     qk_layernorm=True),
             tf.StableLmModel,
             "GQA 4/2; q/k/v biases; per-head LayerNorm on q and k (q_layernorm.norms.{h}); "
             "partial rotary 0.25"),
    _decoder("starcoder2", "starcoder2",
             partial(tf.Starcoder2Config, **LLAMA_LIKE, num_key_value_heads=2), tf.Starcoder2Model,
             "GQA 4/2; biases on every projection (use_bias)"),
    _decoder("olmo", "olmo", partial(tf.OlmoConfig, **LLAMA_LIKE), tf.OlmoModel,
             "LLaMA layout with non-parametric LayerNorm (no norm weights at all)"),
    _decoder("persimmon", "persimmon",
             partial(tf.PersimmonConfig, **LLAMA_LIKE), tf.PersimmonModel,
             "query_key_value rows (H, 3, d) like NeoX; q/k LayerNorm over d (qk_layernorm); "
             "partial rotary 0.5"),
    _decoder("mixtral", "mixtral",
             partial(tf.MixtralConfig, **LLAMA_LIKE, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2),
             tf.MixtralModel, "GQA 4/2; MoE MLP (4 experts, 3-D expert tensors)"),
    _decoder("qwen2_moe", "qwen2_moe",
             partial(tf.Qwen2MoeConfig, **LLAMA_LIKE, num_key_value_heads=2, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=32),
             tf.Qwen2MoeModel, "GQA 4/2; q/k/v biases; MoE with a shared expert"),
]

NO_ATTENTION_CASES: list[ZooCase] = [
    _decoder("mamba", "mamba",
             partial(tf.MambaConfig, **SPECIAL, vocab_size=100, hidden_size=32, state_size=4,
                     num_hidden_layers=2, expand=2, conv_kernel=4),
             tf.MambaModel,
             "built and saved so a tool's refusal can be checked on a real directory; "
             "output_attentions=True is silently ignored (no attentions in the output)",
             unsupported="selective state-space model: no attention modules, no q/k/v "
                         "projections and no attention maps to show",
             eager_only=True),
]

DECODER_CASES: list[ZooCase] = [*GPT_CASES, *LLAMA_CASES, *NO_ATTENTION_CASES]
