"""Speech inputs for HF models: ``--audio FILE.wav`` through the directory's feature extractor
(mono, resampled to its rate), or ``--seq-len N`` seeded random features. Whisper directories
without a feature extractor get Whisper's own (its parameters are fixed apart from the mel bins
and the window, both in config.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnviz.errors import UsageError, param
from attnviz.inputs.audio import read_wav, resample
from attnviz.models.hf_loading import import_transformers, load_processor
from attnviz.models.sources import LoadedModel

if TYPE_CHECKING:
    from attnviz.sequence_inputs import SequenceRequest

WHISPER_RATE, WHISPER_HOP = 16_000, 160  # 10 ms frames; the encoder halves them (20 ms)


def _whisper_frames(config: Any) -> int | None:
    positions = getattr(config, "max_source_positions", None)
    return 2 * positions if isinstance(positions, int) else None  # two stride-1/2 convs


def _extractor(loaded: LoadedModel, notes: list[str]) -> Any:
    assert loaded.path is not None
    extractor = load_processor(loaded.path, "audio")
    if extractor is not None:
        return extractor
    config: Any = getattr(loaded.model, "config", None)
    frames = _whisper_frames(config)
    if config.model_type == "whisper" and frames and frames * WHISPER_HOP % WHISPER_RATE == 0:
        transformers = import_transformers()
        notes.append("no preprocessor_config.json: Whisper's standard log-mel features "
                     f"({config.num_mel_bins} bins, 16 kHz, hop 160, "
                     f"{frames * WHISPER_HOP // WHISPER_RATE} s window)")
        return transformers.WhisperFeatureExtractor(
            feature_size=config.num_mel_bins, sampling_rate=WHISPER_RATE,
            hop_length=WHISPER_HOP, chunk_length=frames * WHISPER_HOP // WHISPER_RATE)
    raise UsageError("this model directory has no feature extractor (preprocessor_config.json) "
                     f"for {param('audio')}", path=loaded.path,
                     hint="save one with extractor.save_pretrained(directory), or use "
                          f"{param('seq_len')} N")


def speech_inputs(loaded: LoadedModel, request: SequenceRequest
                  ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """({main input: features}, labels of the encoder positions, notes)."""
    from attnviz.models.hf_inputs import random_features

    model: Any = loaded.model
    config = model.config
    main = str(model.main_input_name)
    notes: list[str] = []
    frames = _whisper_frames(config) if main == "input_features" else None
    if request.audio is not None:
        if request.seq_len is not None:
            raise UsageError(f"{param('audio')} and {param('seq_len')} both give the input; pass "
                             "one", param="audio")
        extractor = _extractor(loaded, notes)
        rate = int(extractor.sampling_rate)
        samples, source_rate = read_wav(request.audio)
        if source_rate != rate:
            notes.append(f"audio resampled from {source_rate} Hz to {rate} Hz")
            samples = resample(samples, source_rate, rate)
        batch = extractor(samples, sampling_rate=rate, return_tensors="pt")
        features = batch[main]
        hop = int(getattr(extractor, "hop_length", 0) or 0)
    elif request.seq_len is not None:
        if request.seq_len < 1:
            raise UsageError(f"{param('seq_len')} {request.seq_len}: use 1 or more",
                             param="seq_len")
        if frames is not None and request.seq_len != frames:
            raise UsageError(f"{param('seq_len')} {request.seq_len}: {type(model).__name__} "
                             "takes exactly "
                             f"{frames} feature frames (2 x max_source_positions in config.json)",
                             hint=f"use {param('seq_len')} {frames}", param="seq_len")
        if main == "input_features":
            bins = int(getattr(config, "num_mel_bins", 0)
                       or getattr(config, "input_feat_per_channel", 80))
            features = random_features((1, bins, request.seq_len), request.seed)  # (1, F, T)
        else:
            features = random_features((1, request.seq_len), request.seed)  # (1, samples)
        rate, hop = WHISPER_RATE, WHISPER_HOP if frames is not None else 0
        notes.append(f"random {main} (seed {request.seed}): structure only, not speech")
    else:
        raise UsageError(f"{type(model).__name__} is a speech model: give {param('audio')} "
                         "FILE.wav or "
                         f"{param('seq_len')} N (random features)")
    labels: list[str] = []
    if frames is not None and hop:
        seconds = 2 * hop / rate  # each encoder position covers two feature frames
        labels = [f"{i * seconds:.2f}s" for i in range(features.shape[-1] // 2)]
    return {main: features}, labels, notes
