"""Checks on an HF model directory made before transformers reads it.

1. No custom code: transformers imports a directory's own ``*.py`` files when a config names
   them in ``auto_map`` (its "remote code" path, which prompts ``[y/N]`` on a terminal). attnviz
   reads every JSON file an ``Auto*`` class would read, itself and with a size cap, and refuses
   the directory naming the file and class; every transformers call also passes
   ``trust_remote_code=False`` and ``local_files_only=True`` (``SAFE_KWARGS``).
2. Bounded builds: transformers builds whatever config.json declares before it loads a weight.
   Layer counts must match the numbered layers the weights hold (and stay under a cap); the
   model is then built on the ``meta`` device (no memory) and every tensor it would create is
   compared with the file: a shape the weights contradict, or far more elements than the file
   holds (e.g. a ``max_position_embeddings`` that makes an n x n causal-mask buffer), is refused
   before anything is allocated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from attnviz.models.torch_transformer import ModelBuildError

SAFE_KWARGS: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
# every JSON file an Auto* class reads (config, tokenizer, image/feature/video/audio processors)
HF_JSON_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json", "video_preprocessor_config.json",
                 "audio_tokenizer_config.json", "feature_extractor_config.json",
                 "image_processor_config.json")
MAX_HF_JSON_BYTES = 16 * 1024 * 1024
MAX_HF_LAYERS = int(os.environ.get("ATTNVIZ_MAX_HF_LAYERS", "") or 1024)
# the model transformers builds may hold more than the file (buffers, untied heads), not much
BUILD_SLACK_ELEMENTS = 1 << 24
BUILD_FACTOR = 2
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depths")
# configs whose layer count is not the number of stored layers (weights shared across layers)
SHARED_LAYER_MARKERS = ("num_hidden_groups",)


class HFDirectoryError(ModelBuildError):
    """An HF model directory attnviz will not hand to transformers (bad input, exit 2)."""


class RemoteCodeError(HFDirectoryError):
    """A config asks transformers to import code from the model directory."""


def read_json(path: Path) -> Any:
    """A JSON file read with a byte cap; any defect is one bad-input line."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_HF_JSON_BYTES + 1)
        if len(raw) > MAX_HF_JSON_BYTES:
            raise HFDirectoryError(f"{path.name} is over {MAX_HF_JSON_BYTES} bytes", path=path)
        return json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers bad JSON and Python's cap on 4300-digit integers
        raise HFDirectoryError(f"cannot read {path.name} ({str(exc)[:120]})", path=path,
                               hint="fix or remove the file") from exc


def _walk(value: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every JSON object inside ``value`` (sub-configs included)."""
    if depth > 64:
        return
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, depth + 1)


def _describe_target(target: Any) -> str:
    """'modeling_evil.EvilModel' -> 'class EvilModel in modeling_evil.py'."""
    names = [t for t in (target if isinstance(target, list) else [target]) if isinstance(t, str)]
    parts = []
    for name in names[:2]:
        repo, _, reference = name.rpartition("--")
        module, _, cls = reference.rpartition(".")
        where = f"{module}.py" if module else "?"
        parts.append(f"class {cls or reference} in {where}" + (f" of {repo}" if repo else ""))
    return " / ".join(parts) or repr(target)[:80]


def refuse_custom_code(directory: Path) -> None:
    """Raise ``RemoteCodeError`` when any config of ``directory`` names custom code."""
    for name in HF_JSON_FILES:
        path = directory / name
        if not path.is_file():
            continue
        for obj in _walk(read_json(path)):
            auto_map = obj.get("auto_map")
            if auto_map is None:
                continue
            entries = list(auto_map.items()) if isinstance(auto_map, dict) else [
                ("auto_map", auto_map)]
            first_class, target = entries[0] if entries else ("auto_map", auto_map)
            raise RemoteCodeError(
                f"{name} asks transformers to import custom code ({first_class} -> "
                f"{_describe_target(target)}); attnviz never runs code from a model directory "
                "and did NOT run it", path=directory,
                hint="use a model whose model_type transformers itself implements, without "
                     "auto_map")


# -- what config.json may make transformers build -------------------------------------------

def layer_stacks(names: Mapping[str, Any]) -> dict[str, int]:
    """Numbered module lists in the weights: 'encoder.layer' -> how many distinct indices."""
    stacks: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit() and not parts[i - 1].isdigit():
                stacks.setdefault(".".join(parts[:i]), set()).add(parts[i])
    return {prefix: len(indices) for prefix, indices in stacks.items()}


def check_layer_counts(config: dict[str, Any], names: Mapping[str, Any], path: Path) -> None:
    """Every layer count in config.json (sub-configs included) is at most ``MAX_HF_LAYERS`` and
    is the size of a numbered stack of layers in the weights."""
    counts = set(layer_stacks(names).values())
    for obj in _walk(config):
        shared = any(marker in obj for marker in SHARED_LAYER_MARKERS)
        for field in LAYER_FIELDS:
            value = obj.get(field)
            values = value if isinstance(value, list) else [value]
            for item in values:
                if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                    continue
                if item > MAX_HF_LAYERS:
                    raise HFDirectoryError(
                        f"config.json {field} = {item} is over the cap of {MAX_HF_LAYERS} "
                        "layers; transformers would build them all", path=path,
                        hint="set ATTNVIZ_MAX_HF_LAYERS to allow more")
                if not shared and item not in counts:
                    held = ", ".join(str(c) for c in sorted(counts)[:8]) or "none"
                    raise HFDirectoryError(
                        f"config.json {field} = {item} contradicts the weights, whose numbered "
                        f"layer stacks hold {held} layers", path=path,
                        hint="the config and the weights come from different models")


def check_built_model(model: Any, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Compare a model built on the meta device with the file's tensor shapes: refuse a shape
    the weights contradict and a build far larger than the file (names transformers renames
    while loading are not compared; it checks those itself)."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    lookup: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        lookup.setdefault(name, tuple(shape))
        head, _, rest = name.partition(".")
        if rest and head in {prefix, "model"}:
            lookup.setdefault(rest, tuple(shape))
    seen: set[int] = set()
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += int(tensor.numel())  # tied weights count once
        held_shape = lookup.get(name)
        if held_shape is None and prefix:
            held_shape = lookup.get(f"{prefix}.{name}")
        if held_shape is not None and int(tensor.numel()) != _numel(held_shape):
            raise HFDirectoryError(
                f"config.json contradicts the weights: '{name}' is {list(held_shape)} in the file, "
                f"the config builds {list(tensor.shape)}", path=path,
                hint="the config and the weights come from different models")
    total += sum(int(b.numel()) for b in model.buffers() if id(b) not in seen)
    held = sum(_numel(s) for s in shapes.values())
    if total > BUILD_FACTOR * held + BUILD_SLACK_ELEMENTS:
        raise HFDirectoryError(
            f"config.json makes transformers build {total:,} elements but the weights hold "
            f"{held:,}; refusing to build it", path=path,
            hint="the config does not describe these weights")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
