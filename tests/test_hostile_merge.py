"""merge-qkv reads back what split-qkv wrote without trusting it (issue 12, items 4 and 5):
metadata with missing keys, wrong types, impossible head counts, a sidecar that is not JSON,
an npz holding pickled objects; each is one error line with exit code 2, never a traceback."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.split_export import split_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
Edit = Callable[[list[dict[str, Any]]], Any]


def _merge(split: Path, tmp_path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["merge-qkv", str(split), "-o",
                                      str(tmp_path / "merged.safetensors")])
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


def _safetensors_split(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    path = tmp_path / "split.safetensors"
    split_checkpoint(SAMPLES / "mha_kvdim.pth", path, heads=["4"])
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["__metadata__"]["layers"] = edit(header["__metadata__"]["layers"])
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    return path


def _records(edit: Edit) -> Callable[[str], str]:
    def apply(layers: str) -> str:
        records = json.loads(layers)
        result = edit(records)
        return json.dumps(records if result is None else result)

    return apply


def _set(field: str, value: Any) -> Edit:
    def edit(records: list[dict[str, Any]]) -> None:
        records[0][field] = value

    return edit


def _drop(field: str) -> Edit:
    def edit(records: list[dict[str, Any]]) -> None:
        del records[0][field]

    return edit


CASES = [
    ("missing-num-heads", _records(_drop("num_heads")),
     r"layer 0: 'num_heads' is missing or not a positive integer"),
    ("missing-keys", _records(_drop("keys")), r"'keys' is missing or not an object"),
    ("keys-a-string", _records(_set("keys", "q")), r"'keys' is missing or not an object"),
    ("num-heads-a-string", _records(_set("num_heads", "4")), r"'num_heads' is missing"),
    ("num-heads-a-bool", _records(_set("num_heads", True)), r"'num_heads' is missing"),
    ("num-heads-zero", _records(_set("num_heads", 0)), r"'num_heads' is missing"),
    ("num-heads-1e9", _records(_set("num_heads", 10**9)),
     r"does not divide|declares 1000000000 heads"),
    ("kv-heads-do-not-divide", _records(_set("num_kv_heads", 3)),
     r"3 key/value heads do not divide 4 heads"),
    ("head-dim-does-not-fit", _records(_set("head_dim", 3)),
     r"its q tensors are \[4, 16, 64\], which does not fit H=4, Hkv=4, d=3"),
    ("unknown-packing", _records(_set("packing", "zigzag")), r"'packing' is missing or not a "
     "known packing"),
    ("unknown-dtype", _records(_set("dtype", ["F32"])), r"'dtype' is missing"),
    ("stacked-a-string", _records(_set("stacked", "no")), r"'stacked' is missing"),
    ("record-a-list", _records(lambda records: [[1, 2]]), r"layer 0 is not a JSON object"),
    ("layers-an-object", lambda layers: json.dumps({"a": 1}),
     r"'layers' is not a list of layer records"),
    ("layers-not-json", lambda layers: layers[:-3], r"'layers' is not JSON"),
    ("layers-5000-digits", lambda layers: layers.replace('"num_heads": 4',
                                                         '"num_heads": ' + "4" * 5000),
     r"'layers' holds an integer of 5000 digits"),
    ("layers-nested-deeply", lambda layers: "[" * 100_000 + "]" * 100_000,
     r"'layers' nests too deeply"),
]


@pytest.mark.parametrize(("edit", "match"), [pytest.param(e, m, id=i) for i, e, m in CASES])
def test_split_metadata_is_checked_before_use(tmp_path: Path, edit: Callable[[str], str],
                                              match: str) -> None:
    split = _safetensors_split(tmp_path, edit)

    code, err = _merge(split, tmp_path)

    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"attnviz: error: {split}: "), line
    assert re.search(match, line), line
    assert not (tmp_path / "merged.safetensors").exists()


def _npz_split(tmp_path: Path) -> Path:
    path = tmp_path / "split.npz"
    split_checkpoint(SAMPLES / "mha_kvdim.pth", path, heads=["4"])
    return path


@pytest.mark.parametrize(("sidecar", "match"), [
    (b"not json", r"split.npz.json: cannot read split sidecar: it is not JSON"),
    (b'["a list"]', r"split sidecar is not a JSON object of strings"),
    (b'{"format": "attnviz-split", "layers": 7}', r"not a JSON object of strings"),
    (b"\xff\xfe", r"cannot read split sidecar: it is not UTF-8"),
])
def test_npz_sidecar_is_checked(tmp_path: Path, sidecar: bytes, match: str) -> None:
    split = _npz_split(tmp_path)
    (tmp_path / "split.npz.json").write_bytes(sidecar)

    code, err = _merge(split, tmp_path)

    assert code == 2, err
    (line,) = err.splitlines()
    assert re.search(match, line), line


def test_npz_holding_pickled_objects_is_refused_without_unpickling(tmp_path: Path) -> None:
    split = _npz_split(tmp_path)
    sidecar = (tmp_path / "split.npz.json").read_bytes()
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Touch(marker)
    np.savez(split, **{"q.weight": evil})  # allow_pickle is implied for object arrays
    (tmp_path / "split.npz.json").write_bytes(sidecar)

    code, err = _merge(split, tmp_path)

    assert code == 2, err
    assert "npz member 'q.weight.npy' holds objects, not plain numbers" in err
    assert not marker.exists()
    np.load(split, allow_pickle=True)["q.weight"]  # control: numpy would run it
    assert marker.exists()


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_untouched_split_files_still_merge(tmp_path: Path) -> None:
    for split in (_safetensors_split(tmp_path, lambda layers: layers), _npz_split(tmp_path)):
        code, err = _merge(split, tmp_path)
        assert code == 0, err
        (tmp_path / "merged.safetensors").unlink()
