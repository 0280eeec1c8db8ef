"""Hostile and damaged pickles: attnviz must list what a file would run, never run it, and turn
every damaged input into one ``CheckpointError`` line (exit code 2) in bounded work.

Payloads are planted in real torch zip containers: a ``torch.save``'d state_dict whose
``<name>/data.pkl`` record is replaced by pickle bytes built here. Each payload would create a
marker file if it ran; ``test_payloads_are_live_under_torch_load`` proves that they do run
under ``torch.load(weights_only=False)``, so the "marker never created" checks mean something.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import json
import operator
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import attnviz
from attnviz.checkpoint import Checkpoint, load_checkpoint
from attnviz.cli import app
from attnviz.errors import (
    CheckpointError,
    CorruptCheckpointError,
    LimitExceededError,
    UnknownFormatError,
)
from attnviz.inspection import InspectReport, inspect_checkpoint

from .torch_pickles import StorageStub, TensorStub, dumps

# ---------------------------------------------------------------------------------------------
# building torch zip containers with our own data.pkl


def _body(pickled: bytes) -> bytes:
    """A protocol-2 pickle without its PROTO header and STOP, to splice into another stream."""
    assert pickled[:2] == b"\x80\x02" and pickled[-1:] == b"."
    return pickled[2:-1]


@dataclass
class _Base:
    path: Path
    weight: torch.Tensor  # the only tensor, stored as record data/0 (12 float32 elements)

    def stub(self, size: tuple[int, ...] = (4, 3), stride: tuple[int, ...] = (3, 1),
             offset: int = 0, numel: int = 12) -> TensorStub:
        return TensorStub(StorageStub("0", numel), offset, size, stride)


@pytest.fixture
def base(tmp_path: Path) -> _Base:
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "base.pth"
    torch.save({"w": weight}, path)
    return _Base(path, weight)


def _with_data_pkl(src: Path, dst: Path, data: bytes | None) -> Path:
    """Copy the torch zip ``src`` to ``dst`` (stored) with ``*/data.pkl`` replaced or dropped."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            if info.filename.endswith("/data.pkl"):
                if data is not None:
                    out.writestr(info.filename, data)
            else:
                out.writestr(info.filename, source.read(info.filename))
    return dst


# ---------------------------------------------------------------------------------------------
# payloads


class _Call:
    """Pickles as ``func(*args)``; nestable, so calls can feed calls (getattr chains)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)

    def __call__(self, *args: Any) -> None:
        """Only so pickle accepts a _Call as the callable of an outer _Call."""


def _touch(marker: Path) -> str:
    return f"touch {marker}"


PAYLOADS: dict[str, Callable[[Path], _Call]] = {
    "os.system": lambda m: _Call(os.system, _touch(m)),
    "eval": lambda m: _Call(builtins.eval, f"__import__('os').system({_touch(m)!r})"),
    "exec": lambda m: _Call(builtins.exec, f"import os\nos.system({_touch(m)!r})"),
    "subprocess.call": lambda m: _Call(subprocess.call, ["touch", str(m)]),
    "import_module": lambda m: _Call(
        _Call(builtins.getattr, _Call(importlib.import_module, "os"), "system"), _touch(m)),
    "methodcaller": lambda m: _Call(
        _Call(operator.methodcaller, "system", _touch(m)), _Call(importlib.import_module, "os")),
    "getattr_chain": lambda m: _Call(
        _Call(builtins.getattr, _Call(builtins.__import__, "os"), "system"), _touch(m)),
}
# The globals each payload names, as written with Python 2 names (torch.save's default) and
# with Python 3 names.
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "os.system": ({f"{os.system.__module__}.system"}, {f"{os.system.__module__}.system"}),
    "eval": ({"__builtin__.eval"}, {"builtins.eval"}),
    "exec": ({"__builtin__.exec"}, {"builtins.exec"}),
    "subprocess.call": ({"commands.call"}, {"subprocess.call"}),
    "import_module": ({"__builtin__.getattr", "importlib.import_module"},
                      {"builtins.getattr", "importlib.import_module"}),
    "methodcaller": ({"operator.methodcaller", "importlib.import_module"},
                     {"operator.methodcaller", "importlib.import_module"}),
    "getattr_chain": ({"__builtin__.getattr", "__builtin__.__import__"},
                      {"builtins.getattr", "builtins.__import__"}),
}


def _opcode_chain(marker: Path) -> bytes:
    """``getattr(__import__('os'), 'system')('touch ...')`` written as protocol-0 opcodes."""
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + _touch(marker).encode() + b"\ntR")


OPCODE_CHAIN_EXPECTED = {"builtins.getattr", "builtins.__import__"}


def _payload_file(base: _Base, tmp_path: Path, payload: str, placement: str,
                  fix_imports: bool, marker: Path) -> Path:
    """data.pkl = the payload alone ("top") or ``{'w': tensor, 'evil': payload}`` ("value")."""
    if payload == "opcode_chain":
        chain = _opcode_chain(marker)
        if placement == "top":
            data = b"\x80\x02" + chain + b"."
        else:  # splice: {'w': tensor} then SETITEM 'evil' = chain
            data = (b"\x80\x02" + _body(dumps({"w": base.stub()})) + _body(dumps("evil"))
                    + chain + b"s.")
    else:
        obj = PAYLOADS[payload](marker)
        root = obj if placement == "top" else {"w": base.stub(), "evil": obj}
        data = dumps(root, fix_imports=fix_imports)
    name = f"{payload}-{placement}-{'py2' if fix_imports else 'py3'}.pth"
    return _with_data_pkl(base.path, tmp_path / name, data)


def _expected(payload: str, fix_imports: bool) -> set[str]:
    """attnviz reports the Python 3 name, whichever name the pickle was written with."""
    if payload == "opcode_chain":
        return OPCODE_CHAIN_EXPECTED
    return EXPECTED[payload][1]


CASES = [
    pytest.param(payload, placement, fix_imports,
                 id=f"{payload}-{placement}-{'py2names' if fix_imports else 'py3names'}")
    for payload in [*PAYLOADS, "opcode_chain"]
    for placement in ("top", "value")
    for fix_imports in ((True,) if payload == "opcode_chain" else (True, False))
]


def _assert_flags_danger(report: InspectReport, names: set[str]) -> None:
    found = {f.qualified_name: f for f in report.checkpoint.foreign_objects}
    for name in names:
        assert name in found, (name, sorted(found))
        assert found[name].names_code is True, found[name]
        assert any(w.startswith("DANGER") and f"'{name}'" in w for w in report.warnings), (
            name, report.warnings)


# ---------------------------------------------------------------------------------------------
# hostile payloads: listed, flagged, never run


@pytest.mark.parametrize(("payload", "placement", "fix_imports"), CASES)
def test_hostile_payload_is_listed_and_never_run(
    base: _Base, tmp_path: Path, payload: str, placement: str, fix_imports: bool
) -> None:
    marker = tmp_path / "pwned"
    path = _payload_file(base, tmp_path, payload, placement, fix_imports, marker)

    report = inspect_checkpoint(path)
    checkpoint = load_checkpoint(path)
    if placement == "value":
        torch.testing.assert_close(checkpoint.read_tensor("w"), base.weight, rtol=0, atol=0)

    assert not marker.exists()
    _assert_flags_danger(report, _expected(payload, fix_imports))
    if placement == "value":
        assert sorted(report.checkpoint.tensors) == ["w"]
    else:
        assert report.checkpoint.tensors == {}


@pytest.mark.parametrize(("payload", "placement", "fix_imports"), CASES)
def test_payloads_are_live_under_torch_load(
    base: _Base, tmp_path: Path, payload: str, placement: str, fix_imports: bool
) -> None:
    """Control: the same files do run their payload in torch.load(weights_only=False)."""
    marker = tmp_path / "pwned"
    path = _payload_file(base, tmp_path, payload, placement, fix_imports, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()

    torch.load(path, weights_only=False)

    assert marker.exists()


@pytest.mark.parametrize(("payload", "placement", "fix_imports"),
                         [c for c in CASES if c.values[1] == "value"])
def test_cli_inspect_lists_the_payload_and_does_not_run_it(
    base: _Base, tmp_path: Path, payload: str, placement: str, fix_imports: bool
) -> None:
    marker = tmp_path / "pwned"
    path = _payload_file(base, tmp_path, payload, placement, fix_imports, marker)
    runner = CliRunner()
    names = _expected(payload, fix_imports)

    result = runner.invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "DANGER" in result.output
    for name in names:
        assert name in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()

    result = runner.invoke(app, ["inspect", str(path), "--json"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    listed = {f["name"]: f for f in doc["foreign_objects"]}
    for name in names:
        assert listed[name]["names_code"] is True
        assert any(w.startswith("DANGER") and name in w for w in doc["warnings"])
    assert [t["name"] for t in doc["tensors"]] == ["w"]
    assert not marker.exists()


def test_chained_call_payload_is_located_in_the_tree(base: _Base, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _payload_file(base, tmp_path, "getattr_chain", "value", False, marker)

    checkpoint = load_checkpoint(path)

    found = {f.qualified_name: f for f in checkpoint.foreign_objects}
    assert found["builtins.getattr"].where.startswith("evil")
    # details are cut at a fixed length (a long tmp path, as under pytest-xdist, is cut too)
    assert any(f"('touch {str(marker)[:30]}" in f.detail for f in checkpoint.foreign_objects)


_PY2_NAMED = {
    # global -> the Python 3 name attnviz reports (protocol 2 writes '__builtin__.compile' ...)
    "delattr": (lambda m: _Call(builtins.delattr, argparse.Namespace(x=str(m)), "x"),
                "builtins.delattr"),
    "compile": (lambda m: _Call(builtins.compile, "1", str(m), "eval"), "builtins.compile"),
    "setattr": (lambda m: _Call(builtins.setattr, argparse.Namespace(), "x", str(m)),
                "builtins.setattr"),
    "functools.reduce": (lambda m: _Call(functools.reduce, operator.add, [str(m)]),
                         "functools.reduce"),
}


@pytest.mark.parametrize("global_name", sorted(_PY2_NAMED))
def test_torch_saved_code_globals_with_python2_names_are_flagged(
    tmp_path: Path, global_name: str
) -> None:
    build, written_as = _PY2_NAMED[global_name]
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.ones(2, 2)}, "x": build(tmp_path / "victim")}, path)

    report = inspect_checkpoint(path)

    _assert_flags_danger(report, {written_as})


def test_torch_saved_set_is_not_a_foreign_object(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.ones(2, 2)}, "classes": {1, 2, 3}}, path)

    checkpoint = load_checkpoint(path)

    assert [f.qualified_name for f in checkpoint.foreign_objects] == []


# ---------------------------------------------------------------------------------------------
# real training checkpoints with foreign objects


def test_detr_style_namespace_args_give_heads_without_running_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(256, 8)
    state = {f"transformer.encoder.layers.0.self_attn.{k}": v
             for k, v in mha.state_dict().items()}
    path = tmp_path / "detr.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3,
                "args": argparse.Namespace(nheads=8, hidden_dim=256, lr=1e-4)}, path)
    # the file is meaningful: torch's safe loader refuses the Namespace
    with pytest.raises(pickle.UnpicklingError, match=r"argparse\.Namespace"):
        torch.load(path, weights_only=True)

    report = inspect_checkpoint(path)

    ckpt = report.checkpoint
    assert ckpt.container_key == "model"
    foreign = {f.qualified_name: f for f in ckpt.foreign_objects}
    assert set(foreign) == {"argparse.Namespace"}
    assert foreign["argparse.Namespace"].names_code is False
    assert foreign["argparse.Namespace"].where == "args"
    assert not any(w.startswith("DANGER") for w in report.warnings)
    assert [item.layer.name for item in report.layers] == ["transformer.encoder.layers.0.self_attn"]
    heads = report.layers[0].heads
    assert heads.num_heads == 8
    assert "nheads" in heads.source
    assert heads.head_dim == 32
    torch.testing.assert_close(ckpt.read_tensor("transformer.encoder.layers.0.self_attn."
                                                "in_proj_weight"), mha.in_proj_weight.detach())


def _nanogpt_state(embed: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    names = {
        "transformer.wte.weight": (32, embed),
        "transformer.h.0.ln_1.weight": (embed,),
        "transformer.h.0.attn.c_attn.weight": (3 * embed, embed),
        "transformer.h.0.attn.c_attn.bias": (3 * embed,),
        "transformer.h.0.attn.c_proj.weight": (embed, embed),
        "transformer.h.0.attn.c_proj.bias": (embed,),
        "lm_head.weight": (32, embed),
    }
    return {k: torch.randn(*shape, generator=gen) for k, shape in names.items()}


def _nanogpt_checkpoint(path: Path, state: dict[str, torch.Tensor],
                        best_val_loss: Any) -> None:
    model_args = {"n_layer": 1, "n_head": 4, "n_embd": 16, "block_size": 8, "bias": True,
                  "vocab_size": 32, "dropout": 0.0}
    torch.save({
        "model": {f"_orig_mod.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": best_val_loss,
        "config": {"batch_size": 4, "n_head": 4, "compile": True},
    }, path)


def test_nanogpt_style_checkpoint_prefix_stripped_and_heads_from_model_args(
    tmp_path: Path,
) -> None:
    state = _nanogpt_state()
    path = tmp_path / "ckpt.pt"
    _nanogpt_checkpoint(path, state, best_val_loss=2.5)

    report = inspect_checkpoint(path)

    ckpt = report.checkpoint
    assert ckpt.container_key == "model"
    assert ckpt.stripped_prefix == "_orig_mod."
    assert sorted(ckpt.tensors) == sorted(state)
    assert [item.layer.name for item in report.layers] == ["transformer.h.0.attn"]
    assert report.layers[0].heads.num_heads == 4
    assert "model_args" in report.layers[0].heads.source
    torch.testing.assert_close(ckpt.read_tensor("transformer.h.0.attn.c_attn.weight"),
                               state["transformer.h.0.attn.c_attn.weight"])


def test_nanogpt_checkpoint_with_tensor_best_val_loss(tmp_path: Path) -> None:
    state = _nanogpt_state()
    path = tmp_path / "ckpt.pt"
    _nanogpt_checkpoint(path, state, best_val_loss=torch.tensor(2.5))

    report = inspect_checkpoint(path)

    ckpt = report.checkpoint
    assert ckpt.container_key == "model"
    assert ckpt.stripped_prefix == "_orig_mod."
    assert sorted(ckpt.tensors) == sorted(state)
    assert [item.layer.name for item in report.layers] == ["transformer.h.0.attn"]


def test_numpy_scalars_are_harmless_foreign_objects(tmp_path: Path) -> None:
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    path = tmp_path / "best.pth"
    torch.save({"model": state, "best_acc": np.float64(0.5), "epoch": np.int64(12)}, path)

    report = inspect_checkpoint(path)

    ckpt = report.checkpoint
    assert ckpt.container_key == "model"
    assert sorted(ckpt.tensors) == sorted(state)
    scalars = [f for f in ckpt.foreign_objects if f.qualified_name.endswith("multiarray.scalar")]
    assert len(scalars) == 1
    assert scalars[0].names_code is False
    assert scalars[0].where == "best_acc"
    assert scalars[0].detail == "value=0.5"
    assert ckpt.foreign_objects  # numpy.dtype is listed too, and nothing names code
    assert not any(f.names_code for f in ckpt.foreign_objects)
    assert not any(w.startswith("DANGER") for w in report.warnings)


# ---------------------------------------------------------------------------------------------
# damaged inputs: one CheckpointError line, exit code 2


def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _zip_without_data_pkl(base: _Base, tmp_path: Path) -> Path:
    return _with_data_pkl(base.path, tmp_path / "no_pickle.pth", None)


def _overlong_view(base: _Base, tmp_path: Path) -> Path:
    data = dumps({"w": base.stub(size=(100, 3))})
    return _with_data_pkl(base.path, tmp_path / "overlong.pth", data)


def _offset_past_storage(base: _Base, tmp_path: Path) -> Path:
    data = dumps({"w": base.stub(size=(2, 3), offset=10)})
    return _with_data_pkl(base.path, tmp_path / "offset.pth", data)


def _storage_bigger_than_record(base: _Base, tmp_path: Path) -> Path:
    data = dumps({"w": base.stub(size=(100, 3), numel=300)})
    return _with_data_pkl(base.path, tmp_path / "bigstorage.pth", data)


def _write(name: str, make: Callable[[_Base], bytes]) -> Callable[[_Base, Path], Path]:
    def build(base: _Base, tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(make(base))
        return path

    return build


_LFS = (b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        b"size 4404\n")
_HTML = (b"<!DOCTYPE html>\n<html lang=\"en\"><head><title>Sign in</title></head>\n"
         b"<body>Please log in to download model.safetensors</body></html>\n")
_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

DAMAGED: list[Any] = [
    pytest.param(_write("empty.pth", lambda b: b""), UnknownFormatError, "empty", id="empty"),
    pytest.param(_write("random.pth", lambda b: bytes([0x13, 0x37, 0xC0, 0xDE, 0x42])),
                 UnknownFormatError, "unrecognised format", id="5-random-bytes"),
    pytest.param(_write("half.pth", lambda b: b.path.read_bytes()[: b.path.stat().st_size // 2]),
                 CorruptCheckpointError, "zip", id="truncated-torch-zip"),
    pytest.param(_zip_without_data_pkl, CorruptCheckpointError, r"no data\.pkl", id="no-data-pkl"),
    pytest.param(_write("model.safetensors", lambda b: _LFS), UnknownFormatError, "Git LFS",
                 id="git-lfs-pointer"),
    pytest.param(_write("model.bin", lambda b: _HTML), UnknownFormatError, "HTML", id="html"),
    pytest.param(_write("beyond.safetensors",
                        lambda b: struct.pack("<Q", 10_000) + b'{"w": {}}'),
                 CheckpointError, r"unrecognised format|runs past the end",
                 id="safetensors-header-beyond-file"),
    pytest.param(_write("overlap.safetensors", lambda b: _safetensors_bytes(
        {"a": _F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        bytes(12))), CorruptCheckpointError, "overlaps", id="safetensors-overlap"),
    pytest.param(_write("trailing.safetensors", lambda b: _safetensors_bytes(
        {"a": _F32x2}, bytes(12))), CorruptCheckpointError, "trailing bytes",
        id="safetensors-trailing-bytes"),
    pytest.param(_overlong_view, CorruptCheckpointError, r"\(100, 3\).*runs past its storage",
                 id="view-past-storage"),
    pytest.param(_offset_past_storage, CorruptCheckpointError, "runs past its storage",
                 id="offset-past-storage"),
    pytest.param(_storage_bigger_than_record, CorruptCheckpointError, "holds 48 bytes",
                 id="storage-bigger-than-record"),
]


@pytest.mark.parametrize(("build", "error", "match"), DAMAGED)
def test_damaged_input_is_a_checkpoint_error(
    base: _Base, tmp_path: Path, build: Callable[[_Base, Path], Path],
    error: type[CheckpointError], match: str,
) -> None:
    path = build(base, tmp_path)

    with pytest.raises(error, match=match) as caught:
        load_checkpoint(path)

    assert caught.value.exit_code == 2
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("build", "error", "match"), DAMAGED)
def test_damaged_input_via_cli_is_one_line_and_exit_code_2(
    base: _Base, tmp_path: Path, build: Callable[[_Base, Path], Path],
    error: type[CheckpointError], match: str,
) -> None:
    path = build(base, tmp_path)

    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("attnviz: error: ")
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# hostile object graphs cost bounded work

_ATTNVIZ_DIR = str(Path(attnviz.__file__).resolve().parent)
_LINE_BUDGET = 500_000  # Python lines run inside attnviz; the passing cases need a few thousand


class _WorkBudgetExceeded(BaseException):
    """BaseException, so no ``except Exception`` inside attnviz can swallow it."""


def _load_within_budget(path: Path, budget: int = _LINE_BUDGET) -> Checkpoint:
    """load_checkpoint, aborted once attnviz code has run ``budget`` lines (counts work, not
    time, so the check is deterministic)."""
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count > budget:
                raise _WorkBudgetExceeded(f"attnviz ran over {budget} lines on {path.name}")
        return local

    def global_trace(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(_ATTNVIZ_DIR) else None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    try:
        return load_checkpoint(path)
    finally:
        sys.settrace(previous)


def test_self_referencing_containers_load(base: _Base, tmp_path: Path) -> None:
    loop: list[Any] = []
    loop.append(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    data = dumps({"model": {"w": base.stub()}, "loop": loop, "cycle": cycle})
    path = _with_data_pkl(base.path, tmp_path / "loops.pth", data)

    ckpt = _load_within_budget(path)

    assert isinstance(ckpt, Checkpoint)
    assert ckpt.container_key == "model"
    torch.testing.assert_close(ckpt.read_tensor("w"), base.weight, rtol=0, atol=0)


def test_billion_laughs_list_dag_loads(base: _Base, tmp_path: Path) -> None:
    level: list[Any] = [base.stub()]
    for _ in range(30):
        level = [level] * 10  # 10**30 paths, 31 distinct lists thanks to the pickle memo
    data = dumps({"model": {"w": base.stub()}, "laughs": level})
    assert len(data) < 4096
    path = _with_data_pkl(base.path, tmp_path / "laughs.pth", data)

    ckpt = _load_within_budget(path)

    assert isinstance(ckpt, Checkpoint)
    assert ckpt.container_key == "model"
    assert sorted(ckpt.tensors) == ["w"]


def test_work_budget_can_trip(base: _Base, tmp_path: Path) -> None:
    """The budget helper really counts attnviz work (so the tests above can fail)."""
    path = _with_data_pkl(base.path, tmp_path / "plain.pth", dumps({"w": base.stub()}))
    with pytest.raises(_WorkBudgetExceeded):
        _load_within_budget(path, budget=50)
    assert sorted(_load_within_budget(path).tensors) == ["w"]


def test_billion_laughs_dict_dag_beside_a_tensor_loads(base: _Base, tmp_path: Path) -> None:
    level: dict[str, Any] = {}
    for _ in range(30):
        level = {str(i): level for i in range(10)}
    data = dumps({"w": base.stub(), "laughs": level})
    assert len(data) < 4096
    path = _with_data_pkl(base.path, tmp_path / "dict_laughs.pth", data)

    try:
        ckpt = _load_within_budget(path)
    except LimitExceededError:
        return  # refusing the file is fine too
    assert sorted(ckpt.tensors) == ["w"]


class _FakeModule:
    """Pickles like an nn.Module: NEWOBJ of a class, then BUILD with the module __dict__."""

    def __init__(self, parameters: dict[str, Any], modules: dict[str, Any]) -> None:
        self.state = {"training": False, "_parameters": parameters, "_buffers": {},
                      "_non_persistent_buffers_set": set(), "_modules": modules}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_new_fake_module, (), self.state)


def _new_fake_module() -> None:
    """The callable the fake module names (never called by attnviz)."""


def test_billion_laughs_module_dag_loads(base: _Base, tmp_path: Path) -> None:
    module = _FakeModule({"weight": base.stub()}, {})
    for _ in range(30):
        module = _FakeModule({}, {str(i): module for i in range(10)})
    data = dumps(module)
    assert len(data) < 8192
    path = _with_data_pkl(base.path, tmp_path / "module_laughs.pth", data)

    try:
        ckpt = _load_within_budget(path)
    except LimitExceededError:
        return  # refusing the file is fine too
    assert isinstance(ckpt, Checkpoint)
