"""The layout registry: every supported convention, one record each, tried in order.

Adding a layout is one ``LayoutSpec`` here plus its test. Facts come from
``shared/reference/attention-facts.md`` and the libraries that write these files.
"""

from __future__ import annotations

from attnviz.layouts.spec import AuxTensor, Evidence, LayoutSpec, Packing, ShapeRule

_PREFIX = r"^(?P<p>(?:.*\.)?)"  # layer prefix: empty or ending in a dot

_REL_POS = (
    AuxTensor("relative_position_bias_table", "{p}relative_position_bias_table",
              Evidence.HEADS_LAST_DIM),
    AuxTensor("relative_position_index", "{p}relative_position_index"),
)
_QK_NORMS = (
    AuxTensor("q_norm", "{p}q_norm.weight", Evidence.HEAD_DIM_SIZE),
    AuxTensor("q_norm_bias", "{p}q_norm.bias"),
    AuxTensor("k_norm", "{p}k_norm.weight", Evidence.HEAD_DIM_SIZE),
    AuxTensor("k_norm_bias", "{p}k_norm.bias"),
)
_ROTARY = (AuxTensor("rotary_inv_freq", "{p}rotary_emb.inv_freq"),)
_CAUSAL_BUFFERS = (  # old GPT-2 / NeoX files: causal-mask buffers, not projection biases
    AuxTensor("causal_mask_buffer", "{p}bias"),
    AuxTensor("masked_bias_buffer", "{p}masked_bias"),
)

LAYOUTS: tuple[LayoutSpec, ...] = (
    LayoutSpec(
        name="torch_mha",
        description="torch.nn.MultiheadAttention, packed in_proj_weight [3E, E]",
        examples="nn.Transformer, DETR, OpenAI CLIP, open_clip, torchvision ViT",
        anchor=_PREFIX + r"in_proj_weight$",
        packing=Packing.BLOCKED,
        qkv="{p}in_proj_weight", qkv_bias="{p}in_proj_bias",
        out=("{p}out_proj.weight",), out_bias=("{p}out_proj.bias",),
        aux=(AuxTensor("bias_k", "{p}bias_k"), AuxTensor("bias_v", "{p}bias_v")),
        shape_rule=ShapeRule.ROWS_3X_COLS,
        architectures=("detr", "clip", "nn.Transformer"),
    ),
    LayoutSpec(
        name="torch_mha_kvdim",
        description="torch.nn.MultiheadAttention with kdim/vdim: q/k/v_proj_weight, packed bias",
        examples="nn.MultiheadAttention(E, H, kdim=..., vdim=...)",
        anchor=_PREFIX + r"q_proj_weight$",
        packing=Packing.SEPARATE,
        q="{p}q_proj_weight", k="{p}k_proj_weight", v="{p}v_proj_weight",
        qkv_bias="{p}in_proj_bias",
        out=("{p}out_proj.weight",), out_bias=("{p}out_proj.bias",),
        aux=(AuxTensor("bias_k", "{p}bias_k"), AuxTensor("bias_v", "{p}bias_v")),
    ),
    LayoutSpec(
        name="timm_qkv",
        description="fused Linear qkv [3E, E], blocked q|k|v",
        examples="timm ViT/DeiT/Swin/BEiT/EVA (BEiT-style q_bias/v_bias)",
        anchor=_PREFIX + r"qkv\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}qkv.weight", qkv_bias="{p}qkv.bias", q_bias="{p}q_bias", v_bias="{p}v_bias",
        out=("{p}proj.weight", "{p}out_proj.weight"), out_bias=("{p}proj.bias", "{p}out_proj.bias"),
        aux=_REL_POS + _QK_NORMS,
        architectures=("timm", "dinov2-hub", "swin-timm"),
    ),
    LayoutSpec(
        name="fused_qkv_proj",
        description="fused Linear qkv_proj, blocked [Q | K | V] (K/V may be GQA-sized)",
        examples="custom encoders (MobileViT style, out_proj), Phi-3 (o_proj)",
        anchor=_PREFIX + r"qkv_proj\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}qkv_proj.weight", qkv_bias="{p}qkv_proj.bias",
        out=("{p}out_proj.weight", "{p}o_proj.weight"),
        out_bias=("{p}out_proj.bias", "{p}o_proj.bias"),
        aux=_ROTARY + _QK_NORMS,
        architectures=("phi3",),
        not_for=("codegen",),
    ),
    LayoutSpec(
        name="codegen_mp",
        description="fused Linear qkv_proj [3E, E] without bias, 4 model-parallel blocks of "
                    "rows, each [q | v | k] of E/4 rows",
        examples="CodeGen (HF codegen)",
        anchor=_PREFIX + r"qkv_proj\.weight$",
        packing=Packing.SHARDED,
        qkv="{p}qkv_proj.weight",
        out=("{p}out_proj.weight",), out_bias=("{p}out_proj.bias",),
        forbid=("{p}qkv_proj.bias",),
        shape_rule=ShapeRule.ROWS_3X_COLS,
        shards=4, order="qvk",
        architectures=("codegen",), exclusive=True,
    ),
    LayoutSpec(
        name="mpt_wqkv",
        description="fused Linear Wqkv, blocked [Q | K | V]",
        examples="MosaicML MPT",
        anchor=_PREFIX + r"Wqkv\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}Wqkv.weight", qkv_bias="{p}Wqkv.bias",
        out=("{p}out_proj.weight",), out_bias=("{p}out_proj.bias",),
        aux=_QK_NORMS,
        architectures=("mpt",),
    ),
    LayoutSpec(
        name="gpt2_cross",
        description="GPT-2 cross-attention: Conv1D q_attn [E, E] and c_attn [E, 2E] holding "
                    "k|v, keys and values from the encoder states",
        examples="HF GPT-2 with add_cross_attention",
        anchor=_PREFIX + r"q_attn\.weight$",
        packing=Packing.KV_FUSED,
        q="{p}q_attn.weight", q_bias="{p}q_attn.bias",
        kv="{p}c_attn.weight", kv_bias="{p}c_attn.bias",
        out=("{p}c_proj.weight",), out_bias=("{p}c_proj.bias",),
        aux=_CAUSAL_BUFFERS,
        transposed=True,
        architectures=("gpt2",),
    ),
    LayoutSpec(
        name="gpt_bigcode_mha",
        description="fused Linear c_attn [3E, E], per-head interleaved rows (H, 3, d)",
        examples="GPT-BigCode with multi_query=False",
        anchor=_PREFIX + r"c_attn\.weight$",
        packing=Packing.INTERLEAVED,
        qkv="{p}c_attn.weight", qkv_bias="{p}c_attn.bias",
        out=("{p}c_proj.weight",), out_bias=("{p}c_proj.bias",),
        shape_rule=ShapeRule.ROWS_3X_COLS,
        architectures=("gpt_bigcode",), exclusive=True,
    ),
    LayoutSpec(
        name="gpt_bigcode_mqa",
        description="fused Linear c_attn [E + 2d, E], blocked [Q (E) | K (d) | V (d)], one "
                    "key/value head",
        examples="GPT-BigCode / StarCoder (multi_query=True)",
        anchor=_PREFIX + r"c_attn\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}c_attn.weight", qkv_bias="{p}c_attn.bias",
        out=("{p}c_proj.weight",), out_bias=("{p}c_proj.bias",),
        shape_rule=ShapeRule.ROWS_NOT_3X_COLS,
        architectures=("gpt_bigcode",),
    ),
    LayoutSpec(
        name="nanogpt_c_attn",
        description="fused Linear c_attn [3E, E], blocked q|k|v",
        examples="nanoGPT (keys may carry _orig_mod.)",
        anchor=_PREFIX + r"c_attn\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}c_attn.weight", qkv_bias="{p}c_attn.bias",
        out=("{p}c_proj.weight",), out_bias=("{p}c_proj.bias",),
        aux=_CAUSAL_BUFFERS,
        shape_rule=ShapeRule.ROWS_3X_COLS,
        architectures=("nanogpt",),
        not_for=("gpt_bigcode",),
    ),
    LayoutSpec(
        name="gpt2_conv1d",
        description="Conv1D c_attn stored (in, out) [E, 3E], blocked along dim 1",
        examples="HF GPT-2, DistilGPT-2",
        anchor=_PREFIX + r"c_attn\.weight$",
        packing=Packing.BLOCKED,
        qkv="{p}c_attn.weight", qkv_bias="{p}c_attn.bias",
        out=("{p}c_proj.weight",), out_bias=("{p}c_proj.bias",),
        aux=_CAUSAL_BUFFERS,
        transposed=True,
        shape_rule=ShapeRule.COLS_3X_ROWS,
        architectures=("gpt2",),
    ),
    LayoutSpec(
        name="neox_interleaved",
        description="fused query_key_value [3E, E], per-head interleaved rows (H, 3, d)",
        examples="GPT-NeoX, Pythia, BLOOM",
        anchor=_PREFIX + r"query_key_value\.weight$",
        packing=Packing.INTERLEAVED,
        qkv="{p}query_key_value.weight", qkv_bias="{p}query_key_value.bias",
        out=("{p}dense.weight",), out_bias=("{p}dense.bias",),
        aux=_ROTARY + _CAUSAL_BUFFERS,
        shape_rule=ShapeRule.ROWS_3X_COLS,
        architectures=("gpt_neox", "bloom", "persimmon", "falcon"),
    ),
    LayoutSpec(
        name="falcon_grouped",
        description="fused query_key_value, grouped rows (Hkv, H/Hkv + 2, d); Hkv=1 is "
                    "Falcon-7B's [Q | K | V]",
        examples="Falcon (new architecture, 7B multi-query)",
        anchor=_PREFIX + r"query_key_value\.weight$",
        packing=Packing.GROUPED,
        qkv="{p}query_key_value.weight", qkv_bias="{p}query_key_value.bias",
        out=("{p}dense.weight",), out_bias=("{p}dense.bias",),
        aux=_ROTARY,
        shape_rule=ShapeRule.ROWS_NOT_3X_COLS,
        architectures=("falcon",),
    ),
    LayoutSpec(
        name="internlm2_wqkv",
        description="fused wqkv, grouped rows (Hkv, H/Hkv + 2, d)",
        examples="InternLM2",
        anchor=_PREFIX + r"wqkv\.weight$",
        packing=Packing.GROUPED,
        qkv="{p}wqkv.weight", qkv_bias="{p}wqkv.bias",
        out=("{p}wo.weight",), out_bias=("{p}wo.bias",),
        aux=_ROTARY,
        architectures=("internlm2",),
    ),
    LayoutSpec(
        name="hf_q_proj",
        description="separate q_proj/k_proj/v_proj (+ o_proj or out_proj), GQA-aware",
        examples="HF DETR, BART, CLIP, Whisper (HF), LLaMA, Mistral, Qwen",
        anchor=_PREFIX + r"q_proj\.weight$",
        packing=Packing.SEPARATE,
        q="{p}q_proj.weight", k="{p}k_proj.weight", v="{p}v_proj.weight",
        q_bias="{p}q_proj.bias", k_bias="{p}k_proj.bias", v_bias="{p}v_proj.bias",
        out=("{p}o_proj.weight", "{p}out_proj.weight", "{p}dense.weight"),
        out_bias=("{p}o_proj.bias", "{p}out_proj.bias", "{p}dense.bias"),
        aux=_ROTARY + _QK_NORMS + (  # Swin as transformers holds it in memory
            AuxTensor("relative_position_bias_table",
                      "{p}relative_position_bias.relative_position_bias_table",
                      Evidence.HEADS_LAST_DIM),),
    ),
    LayoutSpec(
        name="distilbert_lin",
        description="separate q_lin/k_lin/v_lin + out_lin",
        examples="DistilBERT",
        anchor=_PREFIX + r"q_lin\.weight$",
        packing=Packing.SEPARATE,
        q="{p}q_lin.weight", k="{p}k_lin.weight", v="{p}v_lin.weight",
        q_bias="{p}q_lin.bias", k_bias="{p}k_lin.bias", v_bias="{p}v_lin.bias",
        out=("{p}out_lin.weight",), out_bias=("{p}out_lin.bias",),
        architectures=("distilbert",),
    ),
    LayoutSpec(
        name="hf_query_proj",
        description="separate query_proj/key_proj/value_proj (+ output.dense one module up)",
        examples="DeBERTa-v2/v3",
        anchor=_PREFIX + r"query_proj\.weight$",
        packing=Packing.SEPARATE,
        q="{p}query_proj.weight", k="{p}key_proj.weight", v="{p}value_proj.weight",
        q_bias="{p}query_proj.bias", k_bias="{p}key_proj.bias", v_bias="{p}value_proj.bias",
        out=("{parent}output.dense.weight",), out_bias=("{parent}output.dense.bias",),
        architectures=("deberta-v2", "deberta"),
    ),
    LayoutSpec(
        name="hf_query_key_value",
        description="separate query/key/value (+ out, or output.dense one module up)",
        examples="HF BERT/RoBERTa/ViT, OpenAI Whisper (key without bias)",
        anchor=_PREFIX + r"query\.weight$",
        packing=Packing.SEPARATE,
        q="{p}query.weight", k="{p}key.weight", v="{p}value.weight",
        q_bias="{p}query.bias", k_bias="{p}key.bias", v_bias="{p}value.bias",
        out=("{p}out.weight", "{parent}output.dense.weight", "{p}dense.weight"),
        out_bias=("{p}out.bias", "{parent}output.dense.bias", "{p}dense.bias"),
        aux=_REL_POS,
    ),
    LayoutSpec(
        name="convbert_mixed",
        description="separate query/key/value of the attention half of ConvBERT's mixed "
                    "attention (the other half is span convolution; output.dense reads both, "
                    "so no per-head output columns)",
        examples="ConvBERT",
        anchor=_PREFIX + r"query\.weight$",
        packing=Packing.SEPARATE,
        q="{p}query.weight", k="{p}key.weight", v="{p}value.weight",
        q_bias="{p}query.bias", k_bias="{p}key.bias", v_bias="{p}value.bias",
        architectures=("convbert",), exclusive=True,
    ),
    LayoutSpec(
        name="meta_llama_wq",
        description="separate wq/wk/wv/wo, GQA-aware",
        examples="Meta's original LLaMA consolidated.*.pth",
        anchor=_PREFIX + r"wq\.weight$",
        packing=Packing.SEPARATE,
        q="{p}wq.weight", k="{p}wk.weight", v="{p}wv.weight",
        q_bias="{p}wq.bias", k_bias="{p}wk.bias", v_bias="{p}wv.bias",
        out=("{p}wo.weight",), out_bias=("{p}wo.bias",),
    ),
    LayoutSpec(
        name="transformer_lens",
        description="separate W_Q/W_K/W_V [H, E, d] and W_O [H, d, E] per head, x @ W; biases "
                    "b_Q/b_K/b_V [H, d], b_O [E]",
        examples="TransformerLens HookedTransformer state_dict",
        anchor=_PREFIX + r"W_Q$",
        packing=Packing.PER_HEAD,
        q="{p}W_Q", k="{p}W_K", v="{p}W_V",
        q_bias="{p}b_Q", k_bias="{p}b_K", v_bias="{p}b_V",
        out=("{p}W_O",), out_bias=("{p}b_O",),
        aux=(AuxTensor("causal_mask_buffer", "{p}mask"), AuxTensor("ignore_buffer", "{p}IGNORE")),
        transposed=True,
    ),
    LayoutSpec(
        name="t5_qkvo",
        description="separate q/k/v/o (T5 without bias, MPNet with)",
        examples="T5, mT5 (relative_attention_bias carries H), MPNet",
        anchor=_PREFIX + r"q\.weight$",
        packing=Packing.SEPARATE,
        q="{p}q.weight", k="{p}k.weight", v="{p}v.weight",
        q_bias="{p}q.bias", k_bias="{p}k.bias", v_bias="{p}v.bias",
        out=("{p}o.weight",), out_bias=("{p}o.bias",),
        aux=(AuxTensor("relative_attention_bias", "{p}relative_attention_bias.weight",
                       Evidence.HEADS_LAST_DIM),),
    ),
)

# Final module names that mark a tensor as an attention projection; unclaimed ones are
# reported as unrecognised rather than dropped.
PROJECTION_NAMES = frozenset(
    {
        "qkv", "q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj", "kv_proj",
        "c_attn", "Wqkv", "wqkv", "query_key_value", "qkv_proj", "to_qkv", "to_q", "to_k",
        "to_v", "to_kv", "kv", "key_value", "in_proj", "wq", "wk", "wv", "q_lin", "k_lin",
        "v_lin", "q_attn", "query_proj", "key_proj", "value_proj", "query_global", "key_global",
        "value_global", "q_head", "k_head", "v_head",
    }
)
# Tags for checkpoints whose writer is known from the settings they store, not a config.json.
CHECKPOINT_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("model_args", "nanogpt"),  # nanoGPT's train.py saves model_args beside the weights
)
LAYOUTS_BY_NAME = {spec.name: spec for spec in LAYOUTS}
PROJECTION_LEAVES = frozenset(
    {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
)
