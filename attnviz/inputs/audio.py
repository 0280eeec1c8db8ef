"""WAV files for speech models: read with the stdlib ``wave`` module (PCM 8/16/24/32-bit),
mixed down to mono and resampled with numpy, so that no audio dependency is needed."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np

from attnviz.errors import UsageError, param

MAX_AUDIO_SECONDS = 600
FloatArray = np.ndarray[Any, np.dtype[np.float32]]


def read_wav(path: Path) -> tuple[FloatArray, int]:
    """(samples in [-1, 1] as float32 mono, sample rate) of a PCM WAV file."""
    if not path.is_file():
        raise UsageError(f"{param('audio')} {path}: no such file", param="audio")
    try:
        with wave.open(str(path), "rb") as handle:
            channels, width = handle.getnchannels(), handle.getsampwidth()
            rate, frames = handle.getframerate(), handle.getnframes()
            if rate <= 0 or channels <= 0 or width not in (1, 2, 3, 4):
                raise UsageError(f"{param('audio')} {path}: unsupported WAV ({channels} channels, "
                                 f"{8 * width}-bit, {rate} Hz)", hint="use 8/16/24/32-bit PCM",
                                 param="audio")
            if frames > MAX_AUDIO_SECONDS * rate:
                raise UsageError(f"{param('audio')} {path}: {frames / rate:.0f} s is over the "
                                 f"{MAX_AUDIO_SECONDS} s cap", hint="trim the file", param="audio")
            raw = handle.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise UsageError(f"{param('audio')} {path}: not a PCM WAV file ({exc})",
                         hint="convert it to 16-bit PCM WAV", param="audio") from exc
    usable = len(raw) // (width * channels) * width * channels  # a truncated last frame
    samples = _decode(raw[:usable], width).reshape(-1, channels)  # (frames, channels)
    if samples.shape[0] == 0:
        raise UsageError(f"{param('audio')} {path}: the file holds no samples", param="audio")
    mono: FloatArray = samples.mean(axis=1).astype(np.float32)
    return mono, rate


def _decode(raw: bytes, width: int) -> np.ndarray[Any, Any]:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # 24-bit little-endian: widen each sample to 32 bits
        triples = np.frombuffer(raw, np.uint8).reshape(-1, 3)  # (n, 3)
        padded = np.zeros((triples.shape[0], 4), np.uint8)
        padded[:, 1:] = triples
        return padded.view("<i4").reshape(-1).astype(np.float32) / 2.0 ** 31
    dtype = "<i2" if width == 2 else "<i4"
    return np.frombuffer(raw, dtype).astype(np.float32) / 2.0 ** (8 * width - 1)


def resample(samples: FloatArray, rate: int, target: int) -> FloatArray:
    """Band-limited resampling through the spectrum (frequencies above the lower Nyquist rate
    are dropped, which is the anti-aliasing filter)."""
    if rate == target:
        return samples
    length = max(1, round(samples.shape[0] * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(spectrum.shape[0], length // 2 + 1)
    resized = np.zeros(length // 2 + 1, np.complex128)
    resized[:keep] = spectrum[:keep]
    out = np.fft.irfft(resized, n=length) * (length / samples.shape[0])
    result: FloatArray = out.astype(np.float32)
    return result
