"""Reading back what split-qkv wrote, for merge-qkv, trusting none of it.

A split file's metadata (or its npz sidecar) is file text like any other: every layer record is
checked for its keys, types and ranges before use, head counts are bounded by the tensors the
file really holds (so ``num_heads: 1e9`` costs nothing), and every gathered tensor's shape must
match the record before the layer is merged. Anything else is a one-line CheckpointError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnviz.checkpoint import Checkpoint, load_checkpoint, load_npz, read_json
from attnviz.dtypes import DTYPE_SIZES
from attnviz.errors import CheckpointError, ConfigError
from attnviz.formats.json_text import JsonTextError, parse_json
from attnviz.heads import HeadsInfo
from attnviz.layouts.spec import AttentionLayer, Packing
from attnviz.limits import MAX_DIM

HINT = "pass a file written by 'attnviz split-qkv', unchanged"
_STRINGS = ("name", "layout", "dtype", "heads_source")
_SIZES = ("embed_dim", "kdim", "vdim", "q_rows")
_OPTIONAL_SIZES = ("kv_rows", "fused_rows", "out_features")
_FLAGS = ("transposed", "has_bias", "stacked", "out_proj")
_HEADS = ("num_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class SplitLayer:
    layer: AttentionLayer
    heads: HeadsInfo
    record: dict[str, Any]  # checked: the fields above have their types


def _sidecar(path: Path) -> dict[str, str]:
    try:
        document = read_json(path, "split sidecar")
    except ConfigError as exc:
        raise CheckpointError(exc.message, path=path, hint=HINT) from exc
    if not isinstance(document, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in document.items()):
        raise CheckpointError("split sidecar is not a JSON object of strings", path=path,
                              hint=HINT)
    return document


def read_split(path: Path) -> tuple[dict[str, str], Checkpoint]:
    """The metadata and tensors of a split file in any format (npz: with its sidecar)."""
    sidecar = path.with_name(path.name + ".json")
    if path.suffix == ".npz":
        if not sidecar.exists():
            raise CheckpointError("npz split has no sidecar JSON", path=path,
                                  hint=f"expected {sidecar.name} beside it")
        ckpt = load_npz(path)
        metadata = _sidecar(sidecar)
        ckpt.inputs.append(sidecar)
        return metadata, ckpt
    ckpt = load_checkpoint(path, strip_prefixes=False)  # names must match the metadata's
    metadata = dict(ckpt.metadata)
    if metadata.get("format") != "attnviz-split" and sidecar.is_file():
        metadata = _sidecar(sidecar)
        ckpt.inputs.append(sidecar)
    return metadata, ckpt


def _field_error(index: int, field: str, wanted: str, path: Path) -> CheckpointError:
    return CheckpointError(f"split metadata layer {index}: '{field}' is missing or not {wanted}",
                           path=path, hint=HINT)


def _check(record: Any, index: int, tensors: int, path: Path) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise CheckpointError(f"split metadata layer {index} is not a JSON object", path=path,
                              hint=HINT)

    def is_int(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_DIM

    for name in _STRINGS:
        if not isinstance(record.get(name), str):
            raise _field_error(index, name, "a string", path)
    for name in _FLAGS:
        if not isinstance(record.get(name), bool):
            raise _field_error(index, name, "true or false", path)
    for name in _SIZES:
        if not is_int(record.get(name), 0):
            raise _field_error(index, name, "a size", path)
    for name in _OPTIONAL_SIZES:
        if record.get(name) is not None and not is_int(record.get(name), 0):
            raise _field_error(index, name, "a size or null", path)
    for name in _HEADS:
        if not is_int(record.get(name), 1):
            raise _field_error(index, name, "a positive integer", path)
    keys = record.get("keys")
    if not isinstance(keys, dict) or not keys or len(keys) > 64 or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise _field_error(index, "keys", "an object of role names to tensor names", path)
    if record["packing"] not in {p.value for p in Packing}:
        raise _field_error(index, "packing", "a known packing", path)
    if record["dtype"] not in DTYPE_SIZES:
        raise _field_error(index, "dtype", "a known dtype", path)
    heads, kv_heads = record["num_heads"], record["num_kv_heads"]
    if kv_heads > heads or heads % kv_heads:
        raise CheckpointError(f"split metadata layer {index}: {kv_heads} key/value heads do not "
                              f"divide {heads} heads", path=path, hint=HINT)
    if not record["stacked"] and heads > tensors:  # one tensor per head at least
        raise CheckpointError(f"split metadata layer {index} declares {heads} heads but the file "
                              f"holds {tensors} tensors", path=path, hint=HINT)
    return record


def parse_layers(metadata: dict[str, str], ckpt: Checkpoint, path: Path) -> list[SplitLayer]:
    """The checked layer records of a split file's metadata."""
    text = metadata.get("layers")
    try:
        records = parse_json(text) if isinstance(text, str) else None
    except JsonTextError as exc:
        raise CheckpointError(f"split metadata 'layers' {exc}", path=path, hint=HINT) from exc
    if not isinstance(records, list) or len(records) > max(len(ckpt.tensors), 1):
        raise CheckpointError("split metadata 'layers' is not a list of layer records",
                              path=path, hint=HINT)
    layers = []
    for index, raw in enumerate(records):
        record = _check(raw, index, len(ckpt.tensors), path)
        try:
            layer = AttentionLayer(
                name=record["name"], layout=record["layout"], packing=Packing(record["packing"]),
                transposed=record["transposed"], keys=dict(record["keys"]),
                embed_dim=record["embed_dim"], kdim=record["kdim"], vdim=record["vdim"],
                q_rows=record["q_rows"], kv_rows=record["kv_rows"],
                fused_rows=record["fused_rows"], out_features=record["out_features"],
                has_bias=record["has_bias"], dtype=record["dtype"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"split metadata layer {index} is not a layer ({exc})",
                                  path=path, hint=HINT) from exc
        heads = HeadsInfo(record["num_heads"], record["heads_source"], record["num_kv_heads"],
                          record["head_dim"])
        layers.append(SplitLayer(layer, heads, record))
    return layers


def check_parts(item: SplitLayer, parts: dict[str, Any], path: Path) -> None:
    """Each gathered tensor has the shape the record says: (H|Hkv, d, in), (H|Hkv, d),
    o (H, E_out, d); merging would otherwise fail deep in a reshape."""
    heads, kv_heads = item.record["num_heads"], item.record["num_kv_heads"]
    d = item.record["head_dim"]
    expected = {"q": (heads, d), "k": (kv_heads, d), "v": (kv_heads, d), "q_bias": (heads, d),
                "k_bias": (kv_heads, d), "v_bias": (kv_heads, d)}
    for role, array in parts.items():
        if array is None:
            continue
        shape = tuple(array.shape)
        if role == "o":
            ok = len(shape) == 3 and shape[0] == heads and shape[2] == d
        elif role in expected:
            rank = 2 if role.endswith("_bias") else 3
            ok = len(shape) == rank and shape[:2] == expected[role]
        else:
            ok = True
        if not ok:
            raise CheckpointError(
                f"layer '{item.layer.display_name[:200]}': its {role} tensors are {list(shape)}, "
                f"which does not fit H={heads}, Hkv={kv_heads}, d={d} from the metadata",
                path=path, hint=HINT)
