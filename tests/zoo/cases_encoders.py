"""Zoo cases: bidirectional text encoders (BERT and friends)."""

from __future__ import annotations

from functools import partial
from typing import Any

import transformers as tf

from .spec import ZooCase, text_cli, text_inputs

TEXT: dict[str, Any] = {"vocab_size": 100, "max_position_embeddings": 64}
BERT_LIKE: dict[str, Any] = {**TEXT, "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 64}

# DeBERTa-v3 switches the modeling code reads with getattr; DebertaV2Config does not declare them.
DEBERTA_V3_EXTRAS: dict[str, Any] = {"position_buckets": 8, "share_att_key": True,
                                     "norm_rel_ebd": "layer_norm"}


def _encoder(name: str, model_type: str, config: Any, model_class: Any, notes: str = "",
             **extra: Any) -> ZooCase:
    return ZooCase(name=name, model_type=model_type, family="encoder", config=config,
                   model_class=model_class, inputs=text_inputs, cli_inputs=text_cli(),
                   notes=notes, **extra)


ENCODER_CASES: list[ZooCase] = [
    _encoder("bert", "bert", partial(tf.BertConfig, **BERT_LIKE), tf.BertModel,
             "attention.self.query/key/value + attention.output.dense"),
    _encoder("roberta", "roberta", partial(tf.RobertaConfig, **BERT_LIKE), tf.RobertaModel,
             "BERT keys; positions start at padding_idx + 1"),
    _encoder("xlm_roberta", "xlm-roberta", partial(tf.XLMRobertaConfig, **BERT_LIKE),
             tf.XLMRobertaModel, "RoBERTa layout under another model_type"),
    _encoder("distilbert", "distilbert",
             partial(tf.DistilBertConfig, **TEXT, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
             tf.DistilBertModel, "attention.q_lin/k_lin/v_lin/out_lin"),
    _encoder("albert", "albert",
             partial(tf.AlbertConfig, **BERT_LIKE, embedding_size=16), tf.AlbertModel,
             "one shared layer (albert_layer_groups.0.albert_layers.0) applied "
             "num_hidden_layers=2 times; embeddings 16 -> hidden 32"),
    _encoder("electra", "electra",
             partial(tf.ElectraConfig, **BERT_LIKE, embedding_size=16), tf.ElectraModel,
             "embeddings_project 16 -> 32 before the BERT layers"),
    _encoder("deberta_v2", "deberta-v2",
             partial(tf.DebertaV2Config, **BERT_LIKE, relative_attention=True,
                     pos_att_type=["p2c", "c2p"], position_biased_input=False,
                     **DEBERTA_V3_EXTRAS),
             tf.DebertaV2Model,
             "DeBERTa-v3 style disentangled attention: query_proj/key_proj/value_proj plus "
             "c2p/p2c relative terms from shared rel_embeddings (8 buckets); q scaled by "
             "1/sqrt(3d) before the matmul; no attention interface", eager_only=True),
    _encoder("mpnet", "mpnet", partial(tf.MPNetConfig, **BERT_LIKE), tf.MPNetModel,
             "attention.attn.q/k/v/o; T5-style relative_attention_bias [32, H] added to "
             "scores; no attention interface", eager_only=True),
    _encoder("layoutlm", "layoutlm",
             partial(tf.LayoutLMConfig, **BERT_LIKE, max_2d_position_embeddings=64),
             tf.LayoutLMModel, "BERT attention; bbox omitted (all-zero boxes)"),
    _encoder("mobilebert", "mobilebert",
             partial(tf.MobileBertConfig, **TEXT, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=32, embedding_size=16,
                     intra_bottleneck_size=32, num_feedforward_networks=2),
             tf.MobileBertModel,
             "bottleneck: query/key read the 32-wide shared bottleneck, value reads the "
             "64-wide layer input (kdim 32, vdim 64); 4 heads of d=8; NoNorm"),
    _encoder("convbert", "convbert",
             partial(tf.ConvBertConfig, **BERT_LIKE, embedding_size=32, head_ratio=2,
                     conv_kernel_size=3),
             tf.ConvBertModel,
             "head_ratio=2: 2 self-attention heads of d=8 (all_head_size 16) mixed with "
             "span-based dynamic convolution heads; no attention interface", eager_only=True),
    _encoder("roformer", "roformer", partial(tf.RoFormerConfig, **BERT_LIKE), tf.RoFormerModel,
             "rotary on q/k (sinusoidal table); no attention interface", eager_only=True),
    _encoder("longformer", "longformer",
             partial(tf.LongformerConfig, **BERT_LIKE, attention_window=4), tf.LongformerModel,
             "banded local attention, window 4 (2 each side); L=7 padded to 8 inside the model; "
             "output_attentions are (B, H, L, window + 1) band rows, not (L, L); extra "
             "query_global/key_global/value_global projections (unused without "
             "global_attention_mask)", eager_only=True),
]
