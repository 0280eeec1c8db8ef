"""Heatmaps of HF model directories equal transformers' own eager ``output_attentions``.

Every model is a tiny random one built here with transformers (hidden 32, 2 layers, 4 heads,
vocab 100), its weights re-randomised so that attention is peaked, saved with
``save_pretrained``. attnviz captures maps through the library function ``heatmap`` uses
(``capture_sequence`` / ``image_figure``); the reference is a separate eager load of the same
directory called with the very kwargs attnviz used (``PreparedCall.inputs``) and
``output_attentions=True``.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.inspection import analyse

transformers = pytest.importorskip("transformers")

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def peaked(model: Any) -> Any:
    """Larger weights everywhere (q/k included), every bias non-zero: peaked attention."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise * 0.35)
            elif name.endswith("bias"):
                param.copy_(noise * 0.2)
            else:
                param.copy_(1 + noise * 0.2)
    return model


def tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of 100 ids (tokenizers library), saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), 100)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                         unk_token="[UNK]").save_pretrained(directory)


TEXT = dict(vocab_size=100)
BUILDERS: dict[str, Callable[[], Any]] = {
    "gpt_neo": lambda: transformers.GPTNeoModel(transformers.GPTNeoConfig(
        **TEXT, hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64)),
    "bloom": lambda: transformers.BloomModel(transformers.BloomConfig(
        **TEXT, hidden_size=32, n_layer=2, n_head=4)),
    "mpt": lambda: transformers.MptModel(transformers.MptConfig(
        **TEXT, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)),
    "gemma2": lambda: transformers.Gemma2Model(transformers.Gemma2Config(
        **TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "falcon_alibi": lambda: transformers.FalconModel(transformers.FalconConfig(
        **TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
        new_decoder_architecture=False, multi_query=False, bias=True)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        **TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)),
    "t5": lambda: transformers.T5Model(transformers.T5Config(
        **TEXT, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0)),
    "bart": lambda: transformers.BartModel(transformers.BartConfig(
        **TEXT, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=8, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64)),
    "marian": lambda: transformers.MarianModel(transformers.MarianConfig(
        **TEXT, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, decoder_start_token_id=0, pad_token_id=0)),
    "longformer": lambda: transformers.LongformerModel(transformers.LongformerConfig(
        **TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attention_window=4, max_position_embeddings=80, pad_token_id=1)),
    "led": lambda: transformers.LEDModel(transformers.LEDConfig(
        **TEXT, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=8, encoder_ffn_dim=64, decoder_ffn_dim=64, attention_window=4,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64,
        decoder_start_token_id=2)),
    "big_bird": lambda: transformers.BigBirdModel(transformers.BigBirdConfig(
        **TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attention_type="block_sparse", block_size=2,
        num_random_blocks=1, max_position_embeddings=128)),
    "whisper": lambda: transformers.WhisperModel(transformers.WhisperConfig(
        **TEXT, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=50, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "clip": lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(**TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)),
    "swin": lambda: transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
        window_size=4)),
}


def build(root: Path, family: str) -> Path:
    directory = root / family
    torch.manual_seed(0)
    peaked(BUILDERS[family]()).save_pretrained(directory)
    if family == "clip":
        transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32}
                                        ).save_pretrained(directory)
    if family == "swin":
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}
                                       ).save_pretrained(directory)
    return directory


def eager_reference(directory: Path, prepared: Any) -> Any:
    """transformers' own maps: an eager load of the directory, the same kwargs."""
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager",
                                                   local_files_only=True).eval()
    target = model.get_submodule(prepared.module) if prepared.module else model
    with torch.no_grad():
        return target(**prepared.inputs, output_attentions=True)


def by_role(maps: Any, prepared: Any) -> dict[tuple[str, str], list[torch.Tensor]]:
    grouped: dict[tuple[str, str], list[torch.Tensor]] = {}
    for name in maps:
        grouped.setdefault(prepared.layer_sides(name), []).append(maps[name])
    return grouped


def assert_same(ours: list[torch.Tensor], theirs: Any) -> None:
    assert len(ours) == len(theirs) > 0
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference.float(), atol=2e-5, rtol=1e-4)
    peak = max(float(r[r.isfinite()].max()) for r in theirs)
    keys = theirs[0].shape[-1]
    assert peak > min(0.5, 3 / keys)  # peaked, not uniform: the comparison tells maps apart


def capture(directory: Path, **request: Any) -> tuple[Any, Any, Any]:
    from attnviz.heatmap import capture_sequence
    from attnviz.sequence_inputs import SequenceRequest

    ckpt = load_checkpoint(directory)
    impl = request.pop("attn_implementation", "auto")
    return capture_sequence(directory, ckpt, analyse(ckpt), SequenceRequest(**request),
                            attn_implementation=impl)


TOKENS = "5,17,3,9,42,8,11"


@pytest.mark.parametrize(("family", "implementation"), [
    ("gpt_neo", "eager"), ("bloom", "eager"), ("mpt", "eager"), ("gemma2", "eager"),
    ("bert", "sdpa"), ("falcon_alibi", "eager"),
])
def test_decoder_and_encoder_only_maps_equal_eager(tmp_path: Path, family: str,
                                                   implementation: str) -> None:
    directory = build(tmp_path, family)
    maps, prepared, loaded = capture(directory, tokens=TOKENS)
    assert loaded.attn_implementation == implementation
    assert prepared.inputs["input_ids"].tolist() == [[5, 17, 3, 9, 42, 8, 11]]
    reference = eager_reference(directory, prepared)
    assert_same(list(maps.values()), reference.attentions)
    assert prepared.labels_for(next(iter(maps)), 7, 7)[0][:2] == ["#5", "#17"]
    if family == "falcon_alibi":
        assert any("ALiBi" in note for note in loaded.notes)


def test_sdpa_and_eager_flags_agree_and_sdpa_is_refused_where_missing(tmp_path: Path) -> None:
    directory = build(tmp_path, "bert")
    sdpa, _, _ = capture(directory, tokens=TOKENS, attn_implementation="sdpa")
    eager, _, loaded = capture(directory, tokens=TOKENS, attn_implementation="eager")
    assert loaded.attn_implementation == "eager"
    assert set(sdpa.routes.values()) == {"F.scaled_dot_product_attention"}
    assert set(eager.routes.values()) == {"softmax"}
    assert_same(list(sdpa.values()), list(eager.values()))
    neo = build(tmp_path, "gpt_neo")
    code, _, err = cli("heatmap", str(neo), "-o", str(tmp_path / "x.png"), "--tokens", "1,2",
                       "--attn-implementation", "sdpa")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "GPTNeoModel has no sdpa attention" in err


@pytest.mark.parametrize("family", ["t5", "bart", "marian"])
def test_encoder_decoder_maps_equal_eager_with_their_axes(tmp_path: Path, family: str) -> None:
    directory = build(tmp_path, family)
    maps, prepared, _ = capture(directory, tokens=TOKENS, tgt_tokens="0,4,6")
    reference = eager_reference(directory, prepared)
    roles = by_role(maps, prepared)
    assert_same(roles["source", "source"], reference.encoder_attentions)
    assert_same(roles["target", "target"], reference.decoder_attentions)
    assert_same(roles["target", "source"], reference.cross_attentions)
    cross = next(n for n in maps if prepared.layer_sides(n) == ("target", "source"))
    rows, cols = prepared.labels_for(cross, 3, 7)
    assert rows == ["#0", "#4", "#6"] and cols[:2] == ["#5", "#17"]


def test_default_decoder_input_is_the_start_token(tmp_path: Path) -> None:
    directory = build(tmp_path, "bart")  # decoder_start_token_id 2 in BartConfig
    maps, prepared, _ = capture(directory, tokens=TOKENS)
    assert prepared.inputs["decoder_input_ids"].tolist() == [[2]]
    assert any("decoder_start_token_id 2" in note for note in prepared.notes)
    reference = eager_reference(directory, prepared)
    assert_same(by_role(maps, prepared)["target", "source"], reference.cross_attentions)


def test_bart_default_command_mixed_heads_and_save_maps(tmp_path: Path) -> None:
    """4 encoder / 8 decoder heads: the default command draws one grid, never an error, and
    --save-maps keeps every layer's module name and axes."""
    directory = build(tmp_path, "bart")
    tiny_tokenizer(directory)
    out, saved = tmp_path / "bart.png", tmp_path / "maps.safetensors"
    code, stdout, err = cli("heatmap", str(directory), "-o", str(out), "--text",
                            "the cat sat", "--tgt-text", "a dog", "--save-maps", str(saved))
    assert code == 0, err
    assert "layers have 4, 8 heads" in stdout and out.stat().st_size > 1000
    with safe_open(str(saved), "pt") as handle:
        meta = handle.metadata()
        names = list(json.loads(meta["layers"]))
        axes = json.loads(meta["axes"])
        sides = json.loads(meta["sides"])
        tensors = {name: handle.get_tensor(name) for name in names}
    assert "decoder.layers.1.encoder_attn" in names and "encoder.layers.0.self_attn" in names
    assert axes["decoder.layers.1.encoder_attn"] == ["target", "source"]
    assert sides["source"] == ["the", "cat", "sat"]
    assert sides["target"] == ["<s>", "a", "dog"]  # decoder_start_token_id (2) first
    assert tensors["decoder.layers.1.encoder_attn"].shape == (1, 8, 3, 3)
    assert tensors["encoder.layers.1.self_attn"].shape == (1, 4, 3, 3)
    code, stdout, err = cli("heatmap", str(directory), "-o", str(out), "--text", "the cat",
                            "--layer", "decoder.layers.0.encoder_attn", "--force")
    assert code == 0 and "grid: 1 layer row(s) x 8 head column(s)" in stdout, err  # by name
    code, stdout, err = cli("heatmap", str(directory), "-o", str(out), "--text", "the cat",
                            "--layer", "3", "--head", "7", "--force")
    assert code == 0 and "matrix" in stdout, err


def test_longformer_maps_are_its_banded_attentions(tmp_path: Path) -> None:
    directory = build(tmp_path, "longformer")
    maps, prepared, _ = capture(directory, tokens=TOKENS)
    reference = eager_reference(directory, prepared)
    first = next(iter(maps.values()))
    assert first.shape == (1, 4, 7, 5)  # (B, H, L, 2w + 1), not the padded length as heads
    assert_same(list(maps.values()), reference.attentions)
    assert any("banded" in note for note in prepared.notes)
    code, stdout, err = cli("heatmap", str(directory), "-o", str(tmp_path / "l.png"),
                            "--tokens", TOKENS)
    assert code == 0 and "banded" in stdout, err


def test_led_encoder_is_banded_and_its_decoder_dense(tmp_path: Path) -> None:
    directory = build(tmp_path, "led")
    maps, prepared, _ = capture(directory, tokens=TOKENS, tgt_tokens="2,4")
    reference = eager_reference(directory, prepared)
    roles = by_role(maps, prepared)
    assert roles["source", "source"][0].shape == (1, 4, 7, 5)
    assert_same(roles["source", "source"], reference.encoder_attentions)
    assert_same(roles["target", "target"], reference.decoder_attentions)
    assert_same(roles["target", "source"], reference.cross_attentions)


def test_block_sparse_attention_is_refused_clearly(tmp_path: Path) -> None:
    directory = build(tmp_path, "big_bird")
    code, _, err = cli("heatmap", str(directory), "-o", str(tmp_path / "b.png"), "--tokens",
                       TOKENS)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "block-sparse attention" in err and "original_full" in err


def test_no_tokenizer_labels_are_ids(tmp_path: Path) -> None:
    directory = build(tmp_path, "gpt_neo")
    saved = tmp_path / "maps.safetensors"
    code, _, err = cli("heatmap", str(directory), "-o", str(tmp_path / "m.png"), "--tokens",
                       "5,6,7", "--layer", "0", "--head", "1", "--save-maps", str(saved))
    assert code == 0, err
    with safe_open(str(saved), "pt") as handle:
        assert json.loads(handle.metadata()["source_tokens"]) == ["#5", "#6", "#7"]
    code, _, err = cli("heatmap", str(directory), "-o", str(tmp_path / "n.png"), "--text", "hi")
    assert code == 2 and "no tokenizer for --text" in err


def write_wav(path: Path, rate: int, seconds: float) -> None:
    """Stereo 16-bit PCM: a 440 Hz tone left, 880 Hz right."""
    t = np.arange(int(rate * seconds)) / rate
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 880 * t)
    frames = (np.stack([left, right], axis=1) * 20000).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(frames.tobytes())


def test_whisper_audio_and_random_features_equal_eager(tmp_path: Path) -> None:
    directory = build(tmp_path, "whisper")
    transformers.WhisperFeatureExtractor(feature_size=8, chunk_length=1).save_pretrained(
        directory)
    audio = tmp_path / "tone.wav"
    write_wav(audio, 8000, 0.6)
    maps, prepared, _ = capture(directory, audio=audio, tgt_tokens="1,5,6")
    assert prepared.inputs["input_features"].shape == (1, 8, 100)
    assert any("resampled from 8000 Hz to 16000 Hz" in n for n in prepared.notes)
    reference = eager_reference(directory, prepared)
    roles = by_role(maps, prepared)
    assert_same(roles["source", "source"], reference.encoder_attentions)
    assert_same(roles["target", "source"], reference.cross_attentions)
    assert prepared.sides["source"][:3] == ["0.00s", "0.02s", "0.04s"]  # 50 encoder frames
    maps, prepared, _ = capture(directory, seq_len=100)
    reference = eager_reference(directory, prepared)
    assert_same(by_role(maps, prepared)["source", "source"], reference.encoder_attentions)
    code, _, err = cli("heatmap", str(directory), "-o", str(tmp_path / "w.png"), "--seq-len",
                       "90")
    assert code == 2 and "takes exactly 100 feature frames" in err


def test_whisper_without_feature_extractor_uses_whisper_features(tmp_path: Path) -> None:
    directory = build(tmp_path, "whisper")
    audio = tmp_path / "tone.wav"
    write_wav(audio, 16000, 0.5)
    out = tmp_path / "w.png"
    code, stdout, err = cli("heatmap", str(directory), "-o", str(out), "--audio", str(audio))
    assert code == 0, err
    assert "Whisper's standard log-mel features (8 bins, 16 kHz, hop 160, 1 s window)" in stdout
    code, _, err = cli("heatmap", str(directory), "-o", str(out), "--audio", str(audio),
                       "--tokens", "1,2", "--force")
    assert code == 2 and "both give the input" in err


def test_resampling_keeps_a_tone(tmp_path: Path) -> None:
    from attnviz.inputs.audio import read_wav, resample

    path = tmp_path / "tone.wav"
    write_wav(path, 8000, 0.5)
    samples, rate = read_wav(path)
    assert rate == 8000 and samples.shape == (4000,)
    up = resample(samples, 8000, 16000)
    t = np.arange(8000) / 16000
    expected = (np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 880 * t)) / 2 * 20000
    np.testing.assert_allclose(up, expected / 32768, atol=2e-3)


def demo_image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(path)
    return path


def image_capture(directory: Path, image: Path, **extra: Any) -> tuple[Any, Any, Any]:
    from attnviz.image_heatmap import ImageOptions, image_figure

    ckpt = load_checkpoint(directory)
    figure, maps, description = image_figure(directory, ckpt, analyse(ckpt),
                                             ImageOptions(image=image, **extra))
    return figure, maps, description


def test_clip_text_and_image_both_towers_equal_eager(tmp_path: Path) -> None:
    directory = build(tmp_path, "clip")
    image = demo_image(tmp_path / "x.png")
    figure, maps, _ = image_capture(directory, image, tokens="4,5,6")
    prepared = figure.prepared
    assert set(prepared.inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert prepared.module == ""
    reference = eager_reference(directory, prepared)
    roles = by_role(maps, prepared)
    assert_same(roles["source", "source"], reference.text_model_output.attentions)
    assert_same(roles["image", "image"], reference.vision_model_output.attentions)
    saved = tmp_path / "clip.safetensors"
    code, stdout, err = cli("heatmap", str(directory), "--image", str(image), "--tokens",
                            "4,5,6", "-o", str(tmp_path / "c.png"), "--save-maps", str(saved))
    assert code == 0 and "text tower captured too" in stdout, err
    with safe_open(str(saved), "pt") as handle:
        names = json.loads(handle.metadata()["layers"])
    assert "text_model.encoder.layers.1.self_attn" in names
    assert "vision_model.encoder.layers.1.self_attn" in names
    code, stdout, err = cli("heatmap", str(directory), "--tokens", "4,5,6", "-o",
                            str(tmp_path / "t.png"))
    assert code == 0 and "only the text_model tower runs" in stdout, err


def test_swin_windows_are_placed_back_on_the_grid(tmp_path: Path) -> None:
    from transformers.models.swin.modeling_swin import window_reverse

    from attnviz.models.hf_vision import window_heats

    directory = build(tmp_path, "swin")
    image = demo_image(tmp_path / "x.png")
    figure, maps, _ = image_capture(directory, image, layer="all")
    prepared = figure.prepared
    reference = eager_reference(directory, prepared)
    names = list(maps)
    # transformers returns one map per stage: its last block
    assert_same([maps[names[1]], maps[names[3]]], reference.attentions)
    model = transformers.AutoModel.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        model(**prepared.inputs)  # sets each block's window and shift for this input
    heats = window_heats(maps, model, names, (16, 16))
    for name in names:
        block = model.get_submodule(name.rsplit(".", 1)[0])
        size = block.window_size
        side = 16 if ".layers.0." in name else 8
        windows = maps[name].mean(dim=2).permute(0, 2, 1).reshape(-1, size, size, maps[name]
                                                                 .shape[1])
        plane = window_reverse(windows, size, side, side)  # (1, h, w, H): transformers' own
        plane = block.cyclic_shift(plane, reverse=True)[0].permute(2, 0, 1)
        torch.testing.assert_close(heats[name], plane)
    assert heats[names[1]].shape == (2, 16, 16) and heats[names[3]].shape == (4, 8, 8)
    code, stdout, err = cli("heatmap", str(directory), "--image", str(image), "-o",
                            str(tmp_path / "s.png"), "--layer", "1-2")
    assert code == 0 and "windowed attention" in stdout, err
    code, _, err = cli("heatmap", str(directory), "--image", str(image), "-o",
                       str(tmp_path / "r.png"), "--view", "rollout")
    assert code == 2 and "windowed" in err


def test_report_on_an_encoder_decoder(tmp_path: Path) -> None:
    directory = build(tmp_path, "t5")
    out = tmp_path / "t5.html"
    code, stdout, err = cli("report", str(directory), "-o", str(out), "--tokens", TOKENS,
                            "--tgt-tokens", "0,3")
    assert code == 0, err
    assert "T5Model from t5 (sdpa attention)" in stdout
    page = out.read_text()
    assert "decoder.block.1.layer.1.EncDecAttention" in page and "#17" in page
