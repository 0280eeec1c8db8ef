"""Zoo cases: encoder-decoders, speech, vision and two-tower multimodal models."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import transformers as tf
from torch import nn

from .spec import (
    IMAGE_SIZE,
    INPUT_SEED,
    PATCH,
    TOKENS,
    Inputs,
    ZooCase,
    ids,
    image_cli,
    image_inputs,
    joined,
    pixel_values,
    seeded_randn,
    seq2seq_cli,
    seq2seq_inputs,
    text_cli,
    tgt_tokens,
)

SEQ2SEQ: dict[str, Any] = {"vocab_size": 100, "max_position_embeddings": 64, "d_model": 32,
                           "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64,
                           "decoder_ffn_dim": 64, "encoder_attention_heads": 4,
                           "decoder_attention_heads": 4}
VISION: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 64, "image_size": IMAGE_SIZE,
                          "patch_size": PATCH}
TOWER_TEXT: dict[str, Any] = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "max_position_embeddings": 16, "pad_token_id": 0,
                              "bos_token_id": 1, "eos_token_id": 2}
TOWER_VISION = dict(VISION)
# Accepted through **kwargs only: T5Config declares no decoder_start_token_id (T5's
# _shift_right needs it; hub configs carry 0 = pad), ResNetConfig takes out_features that way.
T5_START: dict[str, Any] = {"decoder_start_token_id": 0}
# DETR reads only the last feature map; with backbone_config given, transformers 5.24 ignores
# use_timm_backbone / use_pretrained_backbone and builds a randomly initialised HF ResNet.
RESNET_OUT: dict[str, Any] = {"out_features": ["stage2"]}
MEL_BINS = 16
AUDIO_FRAMES = 32  # Whisper insists on exactly 2 * max_source_positions input frames


def _seq2seq(name: str, model_type: str, config: Callable[[], Any], model_class: Any,
             start: int, notes: str, **extra: Any) -> ZooCase:
    return ZooCase(name=name, model_type=model_type, family="encoder-decoder", config=config,
                   model_class=model_class, inputs=seq2seq_inputs(start),
                   cli_inputs=seq2seq_cli(start), notes=notes, **extra)


def _vision(name: str, model_type: str, config: Callable[[], Any], model_class: Any,
            notes: str, **extra: Any) -> ZooCase:
    return ZooCase(name=name, model_type=model_type, family="vision", config=config,
                   model_class=model_class, inputs=image_inputs, cli_inputs=image_cli(),
                   notes=notes, **extra)


WHISPER_START = 3


def _whisper_inputs(_model: nn.Module) -> Inputs:
    return {"input_features": seeded_randn(1, MEL_BINS, AUDIO_FRAMES),  # (1, mel, frames)
            "decoder_input_ids": ids(tgt_tokens(WHISPER_START))}


def _tower_inputs(_model: nn.Module) -> Inputs:
    return {"input_ids": ids(TOKENS), "pixel_values": pixel_values()}


SEQ2SEQ_CASES: list[ZooCase] = [
    _seq2seq("t5", "t5",
             partial(tf.T5Config, vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                     num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                     relative_attention_max_distance=16, **T5_START),
             tf.T5Model, 0,
             "SelfAttention/EncDecAttention.q/k/v/o (no bias); NO 1/sqrt(d) scaling; relative "
             "position bias only in layer 0, reused by layer 1", qk_gain=1.0),
    _seq2seq("bart_mixed_heads", "bart",
             partial(tf.BartConfig, **{**SEQ2SEQ, "decoder_attention_heads": 8}),
             tf.BartModel, 2,
             "encoder 4 heads (d=8), decoder self and cross 8 heads (d=4): mixed head counts; "
             "learned positions offset 2"),
    _seq2seq("marian", "marian",
             partial(tf.MarianConfig, **SEQ2SEQ, pad_token_id=0, eos_token_id=2,
                     decoder_start_token_id=0, forced_eos_token_id=2),
             tf.MarianModel, 0, "BART layout, sinusoidal positions; decoder starts at pad"),
    _seq2seq("mbart", "mbart",
             partial(tf.MBartConfig, **SEQ2SEQ, decoder_start_token_id=2), tf.MBartModel, 2,
             "pre-norm BART with final encoder/decoder layer_norm"),
    _seq2seq("pegasus", "pegasus",
             partial(tf.PegasusConfig, **SEQ2SEQ, decoder_start_token_id=0), tf.PegasusModel, 0,
             "pre-norm, sinusoidal positions; decoder starts at pad"),
]

SPEECH_CASES: list[ZooCase] = [
    ZooCase(name="whisper", model_type="whisper", family="speech",
            config=partial(tf.WhisperConfig, vocab_size=100, num_mel_bins=MEL_BINS,
                           d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=AUDIO_FRAMES // 2, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=WHISPER_START, begin_suppress_tokens=None),
            model_class=tf.WhisperModel, inputs=_whisper_inputs,
            cli_inputs={"seq_len": AUDIO_FRAMES, "mel_bins": MEL_BINS, "seed": INPUT_SEED,
                        "tgt_tokens": joined(tgt_tokens(WHISPER_START))},
            notes="conv1/conv2 (stride 2) then 16 encoder frames; k_proj has no bias; "
                  "input_features must be exactly 32 frames; decoder self + cross-attention; "
                  "q is scaled by d**-0.5 (after its bias) BEFORE it reaches the attention "
                  "function, which then runs with scaling=1"),
]

VISION_CASES: list[ZooCase] = [
    _vision("vit", "vit", partial(tf.ViTConfig, **VISION), tf.ViTModel,
            "CLS + 16 patches; on disk encoder.layer.N.attention.attention.query/key/value + "
            "attention.output.dense, in memory (state_dict) layers.N.attention.q/k/v/o_proj"),
    _vision("deit", "deit", partial(tf.DeiTConfig, **VISION), tf.DeiTModel,
            "CLS + distillation token + 16 patches (18 tokens); ViT key names (disk != "
            "state_dict, as for ViT)"),
    _vision("beit", "beit",
            partial(tf.BeitConfig, **VISION, use_relative_position_bias=True,
                    layer_scale_init_value=0.1),
            tf.BeitModel,
            "key has no bias (query/value do); per-layer relative_position_bias_table "
            "[(2*4-1)**2 + 3 = 52, H] added to scores; layer scale lambda_1/lambda_2; disk "
            "names attention.attention.query/key/value, state_dict layers.N.attention.*_proj"),
    _vision("dinov2", "dinov2", partial(tf.Dinov2Config, **{**VISION, "mlp_ratio": 2}),
            tf.Dinov2Model, "CLS + 16 patches; layer_scale; mask_token parameter; disk names "
            "attention.attention.query/key/value, state_dict attention.q/k/v/o_proj"),
    _vision("swin", "swin",
            partial(tf.SwinConfig, image_size=IMAGE_SIZE, patch_size=4, embed_dim=16,
                    depths=[2, 2], num_heads=[2, 4], window_size=4),
            tf.SwinModel,
            "8x8 patch grid in 4x4 windows (maps (B*4, 2, 16, 16)); block 1 of stage 0 "
            "shifted by 2 with a mask; stage 1 is 4x4 = one window (no shift); heads 2 then "
            "4, d=8; relative_position_bias_table [49, H]; disk names attention.self.query/"
            "key/value + attention.output.dense, state_dict attention.q/k/v/o_proj"),
    _vision("detr", "detr",
            partial(tf.DetrConfig, backbone_config=tf.ResNetConfig(
                        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                        layer_type="basic", **RESNET_OUT),
                    d_model=32, encoder_layers=2,
                    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5),
            tf.DetrModel,
            "tiny HF ResNet backbone (no timm): 4x4 feature map = 16 encoder tokens, 5 "
            "object queries; positions added to q and k, not v; decoder self + cross; "
            "disk names *_attn.out_proj and backbone.conv_encoder.model.*, state_dict "
            "*_attn.o_proj and backbone.model.*"),
]

MULTIMODAL_CASES: list[ZooCase] = [
    ZooCase(name="clip", model_type="clip", family="multimodal",
            config=partial(tf.CLIPConfig, text_config=TOWER_TEXT, vision_config=TOWER_VISION,
                           projection_dim=16),
            model_class=tf.CLIPModel, inputs=_tower_inputs,
            cli_inputs={**text_cli(), **image_cli()},
            notes="two towers: text (causal mask, 7 tokens) and vision (CLS + 16 patches); "
                  "q/k/v/out_proj with bias"),
    ZooCase(name="siglip", model_type="siglip", family="multimodal",
            config=partial(tf.SiglipConfig, text_config=TOWER_TEXT, vision_config=TOWER_VISION),
            model_class=tf.SiglipModel, inputs=_tower_inputs,
            cli_inputs={**text_cli(), **image_cli()},
            notes="two towers, bidirectional text; vision has no CLS (16 patches) and a "
                  "pooling head (vision_model.head.attention) that is a torch "
                  "nn.MultiheadAttention: absent from output_attentions"),
]
