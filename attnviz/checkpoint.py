"""``load_checkpoint``: any supported file or directory -> a ``Checkpoint`` of tensor metadata.

No tensor bytes are read and torch is not imported; ``Checkpoint.read_tensor`` reads one
tensor's values on demand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnviz.containers import ForeignObjectInfo, TensorMapping, find_tensor_mapping
from attnviz.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    LimitExceededError,
    param,
)
from attnviz.formats import detect
from attnviz.formats.base import LoadedFile, StorageSpan, require_regular
from attnviz.formats.json_text import JsonTextError, parse_json
from attnviz.formats.safe_pickle import TensorRef
from attnviz.formats.safetensors_format import read_safetensors
from attnviz.formats.torch_legacy import read_torch_legacy
from attnviz.formats.torch_zip import read_torch_zip
from attnviz.limits import LIMITS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from attnviz.arrays import ReadBudget

READERS: dict[str, Callable[[Path], LoadedFile]] = {
    detect.SAFETENSORS: read_safetensors,
    detect.TORCH_ZIP: read_torch_zip,
    detect.TORCH_LEGACY: read_torch_legacy,
}
# Weight files looked for in a model directory, best first.
DIRECTORY_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's metadata and where its bytes are; values are read only on request."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    ref: TensorRef
    span: StorageSpan

    @property
    def numel(self) -> int:
        return self.ref.numel

    @property
    def nbytes(self) -> int:
        return self.ref.nbytes


@dataclass
class Checkpoint:
    """A checkpoint's tensors (by stripped name), provenance and anything foreign it holds."""

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    container_key: str | None = None
    other_containers: list[str] = field(default_factory=list)
    stripped_prefix: str | None = None
    foreign_objects: list[ForeignObjectInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    root: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    # every file read to build this (weights, shards under every name, index, config): outputs
    # must never overwrite one (attnviz.atomic.check_output_path)
    inputs: list[Path] = field(default_factory=list)
    _budget: ReadBudget | None = field(default=None, repr=False, compare=False)

    @property
    def read_budget(self) -> ReadBudget:
        """What reads from this checkpoint may still materialise (attnviz.arrays.ReadBudget)."""
        from attnviz.arrays import ReadBudget

        if self._budget is None:
            sizes = {}
            for item in self.files:
                try:
                    info = item.stat()
                except OSError:
                    continue
                sizes[(info.st_dev, info.st_ino)] = info.st_size
            self._budget = ReadBudget(sum(sizes.values()))
        return self._budget

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_array(self, name: str) -> np.ndarray[Any, Any]:
        """Read one tensor's values as a numpy view (no torch; bfloat16 as a named dtype)."""
        from attnviz.arrays import read_array

        if name not in self.tensors:
            raise CheckpointError(f"no tensor named '{name[:200]}'", path=self.path)
        return read_array(self.tensors[name], self.read_budget)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor's values (imports torch)."""
        from attnviz.arrays import to_torch

        return to_torch(self.read_array(name))


def read_json(path: Path, what: str) -> Any:
    """A JSON file attnviz reads (config, shard index, split sidecar): a regular file within
    ``max_json_bytes``, integers within 64 bits; anything else is a one-line ConfigError."""
    try:
        info = require_regular(path, what)
    except CheckpointError as exc:
        raise ConfigError(exc.message, path=path, hint="fix or remove the file") from exc
    if info.st_size > LIMITS.max_json_bytes:
        raise LimitExceededError(f"{what} is over {LIMITS.max_json_bytes} bytes", path=path)
    try:
        return parse_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} ({exc.strerror})", path=path) from exc
    except JsonTextError as exc:
        raise ConfigError(f"cannot read {what}: it {exc}", path=path,
                          hint=f"fix or remove the file, or pass {param('config')}") from exc


def load_config(path: Path) -> dict[str, Any]:
    config = read_json(path, "config")
    if not isinstance(config, dict):
        raise ConfigError("config is not a JSON object", path=path)
    return config


def _directory_weights(directory: Path) -> Path:
    for name in DIRECTORY_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError("directory holds no weights file", path=directory,
                              hint="expected model.safetensors, pytorch_model.bin or *.pth")
    raise CheckpointError(f"directory holds several weight files: "
                          f"{', '.join(p.name for p in found[:5])}", path=directory,
                          hint="pass one of them, or an *.index.json")


@dataclass
class _Shards:
    loaded: list[LoadedFile]  # each file once, however many names point at it
    names: dict[str, int]  # shard name in the index -> index into ``loaded``
    weight_map: dict[str, str]
    metadata: dict[str, str]
    paths: list[Path]  # every shard name, as a path


def _load_shards(index_path: Path) -> _Shards:
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError("shard index has no weight_map of names to files",
                                     path=index_path)
    if len(weight_map) > LIMITS.max_tensors:
        raise LimitExceededError(f"shard index names over {LIMITS.max_tensors} tensors",
                                 path=index_path)
    shards = _Shards([], {}, weight_map, {}, [])
    by_file: dict[tuple[int, int], int] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / shard_name
        if Path(shard_name).name != shard_name or not os.path.lexists(shard):
            raise CheckpointError(f"shard '{shard_name[:200]}' named by the index is missing",
                                  path=index_path, hint="download every shard next to the index")
        info = require_regular(shard, f"shard '{shard_name[:200]}'")
        shards.paths.append(shard)
        identity = (info.st_dev, info.st_ino)  # links to one file are parsed once
        if identity not in by_file:
            kind = detect.detect_format(shard)
            if kind not in READERS:
                raise CorruptCheckpointError(f"shard '{shard_name[:200]}' is a {kind}",
                                             path=index_path)
            by_file[identity] = len(shards.loaded)
            shards.loaded.append(READERS[kind](shard))
        shards.names[shard_name] = by_file[identity]
    metadata = index.get("metadata")
    if isinstance(metadata, dict):
        shards.metadata = {str(k)[:200]: v if isinstance(v, str) else str(v)[:1000]
                           for k, v in list(metadata.items())[:1000]}
    return shards


def _tensor_infos(mapping: TensorMapping, spans: dict[str, StorageSpan]) -> dict[str, TensorInfo]:
    return {
        name: TensorInfo(name, ref.shape, ref.dtype, ref, spans[ref.storage.key])
        for name, ref in mapping.tensors.items()
    }


def load_npz(path: Path) -> Checkpoint:
    """An ``.npz`` written by split-qkv, as a Checkpoint (merge-qkv reads it back)."""
    from attnviz.formats.npz import read_npz

    if not path.exists():
        raise CheckpointError("no such file", path=path, hint="check the path")
    require_regular(path)
    loaded = read_npz(path)
    tensors = {name: TensorInfo(name, ref.shape, ref.dtype, ref, loaded.spans[ref.storage.key])
               for name, ref in loaded.root.items()}
    return Checkpoint(path=path, format="npz", tensors=tensors, files=[path], inputs=[path])


def load_checkpoint(
    path: str | Path, *, key: str | None = None, config: str | Path | None = None,
    strip_prefixes: bool = True,
) -> Checkpoint:
    """Read a checkpoint's structure without reading tensor values or importing torch.

    ``key`` selects the mapping of tensors inside a wrapper (``model``, ``state_dict.ema``);
    ``config`` names a config.json (default: one beside the checkpoint);
    ``strip_prefixes=False`` keeps ``module.``/``_orig_mod.``/``model.`` prefixes.
    """
    path = Path(path)
    kind = detect.detect_format(path)
    config_path = Path(config) if config is not None else None
    if kind == detect.DIRECTORY:
        if config_path is None and (path / "config.json").is_file():
            config_path = path / "config.json"
        weights = _directory_weights(path)
        kind = detect.detect_format(weights)
    else:
        weights = path
        if config_path is None and (path.parent / "config.json").is_file():
            config_path = path.parent / "config.json"

    if kind == detect.SHARD_INDEX:
        shards = _load_shards(weights)
        tensors: dict[str, TensorInfo] = {}
        foreign: list[ForeignObjectInfo] = []
        for number, shard in enumerate(shards.loaded):
            mapping = find_tensor_mapping(shard.root, None, shard.path, shard.foreign,
                                          strip=False)
            foreign += mapping.foreign
            for name, info in _tensor_infos(mapping, shard.spans).items():
                if shards.names.get(shards.weight_map.get(name, "")) == number:
                    tensors[name] = info
        missing = [n for n in shards.weight_map if n not in tensors]
        if missing:
            raise CorruptCheckpointError(f"{len(missing)} tensors named by the index are not in "
                                         f"their shard, e.g. '{missing[0][:200]}'", path=weights)
        first = shards.loaded[0].format if shards.loaded else None
        checkpoint = Checkpoint(path=path, format=f"sharded {first}" if first else "sharded",
                                tensors=tensors, metadata=shards.metadata,
                                files=[s.path for s in shards.loaded], foreign_objects=foreign,
                                inputs=[weights, *shards.paths])
    else:
        loaded = READERS[kind](weights)
        mapping = find_tensor_mapping(loaded.root, key, weights, loaded.foreign,
                                      strip=strip_prefixes)
        checkpoint = Checkpoint(
            path=path, format=loaded.format, tensors=_tensor_infos(mapping, loaded.spans),
            container_key=mapping.path, other_containers=mapping.alternatives,
            stripped_prefix=mapping.stripped_prefix, foreign_objects=mapping.foreign,
            root=loaded.root, metadata=loaded.metadata, files=[weights],
            warnings=list(mapping.notes), inputs=[weights])
    if path not in checkpoint.inputs:
        checkpoint.inputs.insert(0, path)
    if config_path is not None:
        checkpoint.config = load_config(config_path)
        checkpoint.config_path = config_path
        checkpoint.inputs.append(config_path)
    if not checkpoint.tensors:
        checkpoint.warnings.append("no tensors found in the file")
    return checkpoint
