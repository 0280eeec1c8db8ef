"""`split-qkv` and `merge-qkv`: per-head weights of a whole checkpoint, written atomically.

Layers are read one at a time (only their tensors), split, written and dropped, so peak memory
is about one layer. The output's metadata traces every tensor back to its source key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnviz import __version__
from attnviz.arrays import dtype_of, placeholder, to_torch
from attnviz.atomic import atomic_output, check_output_path
from attnviz.errors import (
    AttnvizError,
    CheckpointError,
    HeadsError,
    NoAttentionError,
    UsageError,
    param,
    render_params,
    with_path,
)
from attnviz.heads import HeadsInfo
from attnviz.heads_override import override_warnings
from attnviz.inspection import LayerReport, inspect_checkpoint
from attnviz.layouts.spec import AttentionLayer
from attnviz.selectors import select
from attnviz.source_hash import BackgroundHash
from attnviz.split import (
    DEFAULT_TOLERANCE,
    Array,
    HeadWeights,
    merge_heads,
    source_keys,
    split_heads,
)
from attnviz.split_metadata import check_parts, parse_layers, read_split
from attnviz.tensor_writers import (
    NpzWriter,
    PlannedTensor,
    SafetensorsStreamWriter,
    format_for,
    open_writer,
)

SPLIT_FORMAT = "attnviz-split"
SPLIT_FORMAT_VERSION = "1"


class VerificationError(AttnvizError):
    """--verify found a layer whose per-head attention differs from the reference."""


@dataclass(frozen=True)
class LayerDone:
    """Progress report after each layer."""

    index: int
    total: int
    layer: str
    layout: str
    heads: HeadsInfo
    tensors: int
    verify: Any  # attnviz.verify.VerifyResult when --verify
    hf_verify: Any = None  # attnviz.verify_hf.HfCheck when --verify on an HF directory


@dataclass
class SplitResult:
    output: Path
    format: str
    layers: list[LayerDone] = field(default_factory=list)
    tensors_written: int = 0
    bytes_written: int = 0
    sidecar: Path | None = None
    upcast: list[str] = field(default_factory=list)
    hf_reference: str | None = None  # what --verify compared with beyond the layout's own math
    warnings: list[str] = field(default_factory=list)  # heads overrides of stored counts

    def _repr_html_(self) -> str:
        from attnviz.notebook_tables import split_html

        return split_html(self)


def head_tensors(hw: HeadWeights, *, stacked: bool = False,
                 out_proj: bool = True) -> dict[str, Array]:
    """Export names: ``{layer}.heads.{h}.q.weight [d, E]`` ... or stacked ``{layer}.q.weight``."""
    prefix = f"{hw.layer.name}." if hw.layer.name else ""
    out: dict[str, Array] = {}
    roles = [("q", hw.q, hw.q_bias), ("k", hw.k, hw.k_bias), ("v", hw.v, hw.v_bias)]
    if stacked:
        for role, weight, bias in roles:
            out[f"{prefix}{role}.weight"] = weight  # (H|Hkv, d, in)
            if bias is not None:
                out[f"{prefix}{role}.bias"] = bias  # (H|Hkv, d)
        if out_proj and hw.o is not None:
            out[f"{prefix}o.weight"] = hw.o  # (H, E_out, d)
    else:
        for role, weight, bias in roles:
            group = "heads" if role == "q" or hw.num_kv_heads == hw.num_heads else "kv_heads"
            for index in range(weight.shape[0]):
                out[f"{prefix}{group}.{index}.{role}.weight"] = weight[index]  # (d, in)
                if bias is not None:
                    out[f"{prefix}{group}.{index}.{role}.bias"] = bias[index]  # (d,)
        if out_proj and hw.o is not None:
            for index in range(hw.num_heads):
                out[f"{prefix}heads.{index}.o.weight"] = hw.o[index]  # (E_out, d)
    if out_proj and hw.o_bias is not None:
        out[f"{prefix}o.bias"] = hw.o_bias  # (E_out,): shared, not per head
    for role, tensor in hw.carried.items():
        out[f"{prefix}{role}"] = tensor
    return out


def layer_record(item: LayerReport, *, stacked: bool, out_proj: bool) -> dict[str, Any]:
    layer, heads = item.layer, item.heads
    group = (heads.num_heads or 1) // (heads.num_kv_heads or 1)
    return {
        "name": layer.name, "layout": layer.layout, "packing": layer.packing.value,
        "transposed": layer.transposed, "keys": layer.keys, "embed_dim": layer.embed_dim,
        "kdim": layer.kdim, "vdim": layer.vdim, "q_rows": layer.q_rows,
        "kv_rows": layer.kv_rows, "fused_rows": layer.fused_rows,
        "out_features": layer.out_features, "has_bias": layer.has_bias, "dtype": layer.dtype,
        "num_heads": heads.num_heads, "num_kv_heads": heads.num_kv_heads,
        "head_dim": heads.head_dim, "heads_source": heads.source,
        "kv_map": [h // group for h in range(heads.num_heads or 0)],
        "stacked": stacked, "out_proj": out_proj,
    }


def _select(items: list[LayerReport], selector: str | None, path: Path) -> list[LayerReport]:
    """The layers ``selector`` picks (attnviz.selectors grammar), in checkpoint order."""
    if not items:
        raise NoAttentionError("no attention layers recognised, nothing to split", path=path,
                               hint="run 'attnviz inspect' to see what the file holds")
    chosen = items
    if selector is not None:
        names = [i.layer.display_name for i in items]
        try:
            indices = select(selector, names, param="layers")
        except AttnvizError as error:
            raise with_path(error, path) from None
        chosen = [items[i] for i in sorted(indices or ())]
    unknown = [i.layer.display_name for i in chosen if i.heads.num_heads is None]
    if unknown:
        raise HeadsError(f"number of heads unknown for {len(unknown)} layer(s), e.g. "
                         f"'{unknown[0]}'", path=path,
                         hint=f"pass {param('heads')} N (or {param('heads')} 'pattern=N')")
    return chosen




def split_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    heads: Iterable[str] = (),
    config: str | Path | None = None,
    key: str | None = None,
    layers: str | None = None,
    fmt: str | None = None,
    stacked: bool = False,
    out_proj: bool = True,
    verify: bool = False,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    on_layer: Callable[[LayerDone], None] | None = None,
    hashing: BackgroundHash | None = None,
    layout: str | None = None,
) -> SplitResult:
    """Write every selected layer's per-head weights to ``output``; see module docstring.

    ``hashing``: a source hash already started (the CLI starts it before heavy imports).
    """
    output = Path(output)
    fmt = format_for(output, fmt)
    source = Path(checkpoint)
    if hashing is None:
        hashing = BackgroundHash([source] if source.is_file() else [])  # starts reading now
    try:
        return _split(source, output, hashing, heads=heads, config=config, key=key,
                      layers=layers, fmt=fmt, stacked=stacked, out_proj=out_proj,
                      verify=verify, force=force, tolerance=tolerance, on_layer=on_layer,
                      layout=layout)
    finally:
        hashing.cancel()


def _split(checkpoint: Path, output: Path, hashing: BackgroundHash, *, heads: Iterable[str],
           config: str | Path | None, key: str | None, layers: str | None, fmt: str,
           stacked: bool, out_proj: bool, verify: bool, force: bool, tolerance: float,
           on_layer: Callable[[LayerDone], None] | None, layout: str | None) -> SplitResult:
    report = inspect_checkpoint(checkpoint, heads=heads, config=config, key=key, layout=layout)
    ckpt = report.checkpoint
    selected = _select(report.layers, layers, checkpoint)
    check_output_path(output, [checkpoint, *ckpt.inputs], force=force)
    sidecar = output.with_name(output.name + ".json") if fmt != "safetensors" else None
    if sidecar is not None:  # before anything is written
        check_output_path(sidecar, [checkpoint, *ckpt.inputs, output], force=force)
    if hashing.paths != ckpt.files:  # a directory or sharded checkpoint: hash its weight files
        hashing.restart(ckpt.files)

    plan: list[PlannedTensor] = []
    for item in selected:  # names, shapes, dtypes from metadata alone (zero-stride stand-ins)
        stand_ins = {k: placeholder(ckpt.tensors[k].shape, ckpt.tensors[k].dtype)
                     for k in source_keys(item.layer, out_proj=out_proj)}
        planned = head_tensors(split_heads(item.layer, item.heads, stand_ins),
                               stacked=stacked, out_proj=out_proj)
        plan += [PlannedTensor(n, tuple(a.shape), dtype_of(a)) for n, a in planned.items()]
    # The source hash (a full read) runs beside the split; the header holds a same-length
    # token per file that is overwritten with the digest once it is known.
    tokens = {path.name: secrets.token_hex(32) for path in ckpt.files}
    metadata = {
        "format": SPLIT_FORMAT, "format_version": SPLIT_FORMAT_VERSION,
        "attnviz_version": __version__, "source_file": Path(checkpoint).name,
        "source_sha256": json.dumps(tokens),
        "layers": json.dumps([layer_record(i, stacked=stacked, out_proj=out_proj)
                              for i in selected]),
    }
    result = SplitResult(output=output, format=fmt, warnings=override_warnings(selected))
    failures: list[Any] = []
    hf_checks: dict[str, Any] = {}
    if verify:
        result.hf_reference, hf_checks = _verify_with_transformers(checkpoint, ckpt, selected,
                                                                   report.layers)
    with atomic_output(output) as temp:
        writer = open_writer(fmt, temp, plan, metadata)
        try:
            for index, item in enumerate(selected):
                wanted = source_keys(item.layer, out_proj=out_proj or verify)
                source = {name: ckpt.read_array(name) for name in wanted}
                hw = split_heads(item.layer, item.heads, source)
                tensors = head_tensors(hw, stacked=stacked, out_proj=out_proj)
                for name, array in tensors.items():
                    writer.write(name, array)
                    result.bytes_written += array.nbytes
                result.tensors_written += len(tensors)
                checked = _verify(hw, source) if verify else None
                if checked is not None and not checked.ok(tolerance):
                    failures.append(checked)
                hf_check = hf_checks.get(item.layer.name)
                if hf_check is not None and not hf_check.ok():
                    failures.append(hf_check)
                done = LayerDone(index, len(selected), item.layer.display_name,
                                 item.layer.layout, item.heads, len(tensors), checked, hf_check)
                result.layers.append(done)
                if on_layer is not None:
                    on_layer(done)
            digests = hashing.result()
            if isinstance(writer, SafetensorsStreamWriter):
                for name, token in tokens.items():
                    writer.patch_header(token, digests[name])
            writer.finish()
        finally:
            writer.close()
        metadata["source_sha256"] = json.dumps(digests)
        if isinstance(writer, NpzWriter):
            result.upcast = writer.upcast
            metadata["upcast_to_float32"] = json.dumps(writer.upcast)
        if failures:
            worst = max(failures, key=lambda r: r.max_abs_error)
            reference = getattr(worst, "reference", None) or f"transformers {worst.module}"
            why = f" ({worst.problem})" if getattr(worst, "problem", None) else ""
            raise VerificationError(
                f"{param('verify', True)}: {len(failures)} layer(s) differ from {reference}, worst "
                f"'{worst.layer}' max abs error {worst.max_abs_error:.3g}{why}; no output "
                "written", path=checkpoint,
                hint=f"if the layout is wrong, pass {param('layout')} NAME; otherwise please "
                     f"report this with the {param('debug')} output", param="verify")
        if sidecar is not None:
            with atomic_output(sidecar) as side_temp:
                side_temp.write_text(json.dumps(metadata, indent=2) + "\n")
            result.sidecar = sidecar
    return result


def _verify_with_transformers(path: Path, ckpt: Any, selected: list[LayerReport],
                              every: list[LayerReport]) -> tuple[str | None, dict[str, Any]]:
    """For an HF model directory: every selected layer against the HF module's own q/k/v
    (the model built with the heads overrides of ``every`` layer)."""
    from attnviz.models.sources import is_hf_directory

    if not is_hf_directory(path):
        return None, {}
    try:
        import transformers  # noqa: F401 - only whether the hf extra is there
    except ImportError:
        return None, {}
    from attnviz.verify_hf import verify_directory

    splits = {}
    for item in selected:
        source = {name: to_torch(ckpt.read_array(name)) for name in source_keys(item.layer)}
        splits[item.layer.name] = split_heads(item.layer, item.heads, source)
    from attnviz.models.torch_transformer import ModelBuildError

    try:
        reference, checks = verify_directory(path, splits, heads_from=every)
    except ModelBuildError as error:  # e.g. a model_type this transformers does not know
        return f"not transformers ({render_params(error.message)})", {}
    return reference, {check.layer: check for check in checks}


def _verify(hw: HeadWeights, source: dict[str, Array]) -> Any:
    """Run --verify on torch copies of exactly the arrays that were written."""
    from attnviz.verify import verify_split

    return verify_split(hw.map(to_torch), {k: to_torch(v) for k, v in source.items()})


@dataclass
class MergeResult:
    output: Path
    layers: int
    tensors: int


def _gather(layer: AttentionLayer, heads: HeadsInfo, record: dict[str, Any],
            read: Callable[[str], Array], names: set[str]) -> HeadWeights:
    """Reassemble ``HeadWeights`` from a split file's per-head (or stacked) tensors."""
    prefix = f"{layer.name}." if layer.name else ""
    num_heads, kv_heads = int(heads.num_heads or 0), int(heads.num_kv_heads or 0)

    def part(role: str, kind: str) -> Array | None:
        if record["stacked"]:
            name = f"{prefix}{role}.{kind}"
            return read(name) if name in names else None
        count = num_heads if role in {"q", "o"} else kv_heads
        group = "heads" if role in {"q", "o"} or kv_heads == num_heads else "kv_heads"
        found = [f"{prefix}{group}.{i}.{role}.{kind}" for i in range(count)]
        if not all(n in names for n in found):
            return None
        return np.stack([read(n) for n in found])  # (H|Hkv, d, in) or (H, d)

    q, k, v = part("q", "weight"), part("k", "weight"), part("v", "weight")
    if q is None or k is None or v is None:
        raise CheckpointError(f"split file lacks q/k/v tensors of layer '{layer.display_name}'")
    carried = {r: read(f"{prefix}{r}") for r in ("bias_k", "bias_v") if f"{prefix}{r}" in names}
    o_bias_name = f"{prefix}o.bias"
    return HeadWeights(layer, num_heads, kv_heads, int(heads.head_dim or 0), q, k, v,
                       part("q", "bias"), part("k", "bias"), part("v", "bias"),
                       part("o", "weight"), read(o_bias_name) if o_bias_name in names else None,
                       carried)


def merge_split(split: str | Path, output: str | Path, *, force: bool = False) -> MergeResult:
    """Rebuild the original stored tensors (packed, transposed...) from a split file."""
    split, output = Path(split), Path(output)
    fmt = format_for(output, None)
    if fmt == "npz":
        raise UsageError("merge-qkv writes .safetensors or .pt/.pth, not .npz", path=output)
    metadata, ckpt = read_split(split)
    if metadata.get("format") != SPLIT_FORMAT:
        raise CheckpointError("not an attnviz split file (no attnviz split metadata)",
                              path=split, hint="pass a file written by 'attnviz split-qkv'")
    check_output_path(output, [split, *ckpt.inputs], force=force)
    records = parse_layers(metadata, ckpt, split)
    names = set(ckpt.tensors)
    merged: dict[str, Array] = {}
    for item in records:
        try:
            hw = _gather(item.layer, item.heads, item.record, ckpt.read_array, names)
            check_parts(item, {"q": hw.q, "k": hw.k, "v": hw.v, "q_bias": hw.q_bias,
                               "k_bias": hw.k_bias, "v_bias": hw.v_bias, "o": hw.o}, split)
            merged.update(merge_heads(hw))
        except (ValueError, IndexError, ZeroDivisionError) as exc:  # shapes the record lied about
            raise CheckpointError(f"layer '{item.layer.display_name[:200]}' does not fit its "
                                  f"split metadata ({str(exc)[:120]})", path=split) from exc
        except AttnvizError as exc:
            raise with_path(exc, split) from exc
    plan = [PlannedTensor(name, tuple(a.shape), dtype_of(a)) for name, a in merged.items()]
    with atomic_output(output) as temp:
        writer = open_writer(fmt, temp, plan, {"source": split.name})
        try:
            for name, array in merged.items():
                writer.write(name, array)
            writer.finish()
        finally:
            writer.close()
    return MergeResult(output, len(records), len(merged))
