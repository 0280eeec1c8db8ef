"""Hostile pickles, round two (issue 12): views rewritten after their check, containers nested
past the C stack, globals outside the inert allowlist, pickles inside pickles, and DANGER lines
that must survive hostile text.

Files are real torch zips whose ``data.pkl`` is written here, often opcode by opcode
(tests/torch_pickles.py). Where a payload could run code, a control proves it does run under
``torch.load(weights_only=False)``, so "attnviz did not run it" means something.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import CorruptCheckpointError
from attnviz.formats.placeholders import TORCH_LAYERS, is_inert
from attnviz.formats.safe_pickle import TensorRef
from attnviz.inspection import inspect_checkpoint

from .torch_pickles import (
    StorageStub,
    TensorStub,
    dumps,
    op_call,
    op_global,
    op_int,
    op_stack_global,
    op_str,
    with_entry,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "base.pth"
    path.parent.mkdir()
    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(4, 3)}, path)
    return path


def _plain() -> bytes:
    """data.pkl of ``{'w': (4, 3) float32 view of storage '0'}``, as torch writes it."""
    return dumps({"w": TensorStub(StorageStub(), 0, (4, 3), (3, 1))})


def _zip(base: Path, dst: Path, data: bytes) -> Path:
    with zipfile.ZipFile(base) as source, zipfile.ZipFile(dst, "w") as out:
        for info in source.infolist():
            is_pickle = info.filename.endswith("/data.pkl")
            out.writestr(info.filename, data if is_pickle else source.read(info.filename))
    return dst


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


class _Call:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


# ---------------------------------------------------------------------------------------------
# item 2: a view is checked when it is built and again when its bytes are read


def test_build_cannot_rewrite_a_view_after_it_was_checked(base: Path, tmp_path: Path) -> None:
    rewrite = {"offset": 10**6, "shape": (10**6,), "stride": (1,)}
    path = _zip(base, tmp_path / "rewrite.pth", dumps(
        {"w": TensorStub(StorageStub(), 0, (4, 3), (3, 1), state=rewrite)}))
    assert "BUILD" in {op.name for op, _, _ in pickletools.genops(_zip_pickle(path))}

    with pytest.raises(CorruptCheckpointError, match=r"rewrites a TensorRef after it was built"):
        load_checkpoint(path)
    result = _cli("split-qkv", str(path), "-o", str(tmp_path / "out.safetensors"), "--heads", "1")
    assert result.exit_code == 2 and "rewrites a TensorRef" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def _zip_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def test_build_cannot_rewrite_a_storage_record(base: Path, tmp_path: Path) -> None:
    data = _plain()
    (persid,) = [pos for op, _, pos in pickletools.genops(data) if op.name == "BINPERSID"]
    # right after the storage is pushed: BUILD it with {'numel': 10**9}
    build = b"}" + op_str("numel") + op_int(10**9) + b"sb"
    path = _zip(base, tmp_path / "storage.pth", data[:persid + 1] + build + data[persid + 1:])

    with pytest.raises(CorruptCheckpointError, match=r"rewrites a StorageRef after it was built"):
        load_checkpoint(path)


@pytest.mark.parametrize(("shape", "stride", "offset", "match"), [
    ((100, 3), (3, 1), 0, r"runs past its storage \(1200 bytes of 48\)"),
    ((4, 3), (3, 1), 1, r"runs past its storage \(52 bytes of 48\)"),
    ((4, 3), (3, 1), -1, r"negative or non-integer offset -1"),
    ((-4, 3), (3, 1), 0, r"negative size or stride"),
    ((4, 3), (-3, 1), 9, r"negative size or stride"),
    ((4, 3), (3,), 0, r"differ in rank"),
])
def test_every_read_checks_the_view_against_the_real_storage(
    base: Path, shape: tuple[int, ...], stride: tuple[int, ...], offset: int, match: str,
) -> None:
    """Whatever happened to a record after parsing, the read checks it against the storage's
    real byte length before reading: bad input, never a read past the storage, never OSError."""
    ckpt = load_checkpoint(base)
    info = ckpt.tensors["w"]
    assert info.span.length == 48  # the record's own length, not what the pickle declared
    ref = TensorRef(info.ref.storage, offset, shape, stride)  # built without make_tensor_ref
    ckpt.tensors["w"] = dataclasses.replace(info, shape=shape, ref=ref)

    with pytest.raises(CorruptCheckpointError, match=match):
        ckpt.read_array("w")
    with pytest.raises(CorruptCheckpointError, match=match):
        ckpt.read_tensor("w")


def _deep_key_pickle(depth: int) -> bytes:
    """``{'w': tensor, ((((None,),),),): 1}`` with the tuple key nested ``depth`` deep."""
    plain = _plain()
    return plain[:-1] + b"N" + b"\x85" * depth + b"K\x01s."


def test_deep_tuple_dict_key_is_refused_before_c_code_hashes_it(base: Path,
                                                                tmp_path: Path) -> None:
    """Hashing a tuple recurses in C once per level: 200,000 levels overflow the C stack (a
    segfault, so the file is read in a child process that a regression would kill)."""
    path = _zip(base, tmp_path / "deep.pth", _deep_key_pickle(200_000))
    done = subprocess.run([sys.executable, "-m", "attnviz", "inspect", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert done.stderr.splitlines() == [
        f"attnviz: error: {path}: pickle nests containers over 1000 deep (raise "
        "ATTNVIZ_MAX_PICKLE_NESTING if the file is real)"]
    ok = _zip(base, tmp_path / "nested.pth", _deep_key_pickle(500))  # deep, but under the cap
    assert sorted(load_checkpoint(ok).tensors) == ["w"]


# ---------------------------------------------------------------------------------------------
# item 3: every global outside the inert allowlist gets a DANGER line naming it

CODE_GLOBALS = [
    "cProfile.run", "profile.run", "uuid._get_command_stdout", "_osx_support._read_output",
    "distutils.spawn.spawn", "torch.utils.collect_env.run", "torch.storage._load_from_bytes",
    "timeit.timeit", "shutil.rmtree", "builtins.breakpoint", "a_package_nobody_knows.make",
    "numpy.load", "torch.nn.modules.module.register_module_forward_hook",
    "torch.nn.modules.linear.Linear.register_forward_hook", "collections.namedtuple",
]


@pytest.mark.parametrize("name", CODE_GLOBALS)
def test_every_global_outside_the_allowlist_gets_a_danger_line(
    base: Path, tmp_path: Path, name: str
) -> None:
    module, attr = name.rsplit(".", 1)
    if ".Linear." in name:  # a dotted name: a method reached through an allowlisted class
        module, attr = "torch.nn.modules.linear", "Linear.register_forward_hook"
    call = op_call(op_stack_global(module, attr), op_str("touch /tmp/attnviz-never"))
    path = _zip(base, tmp_path / "code.pth", with_entry(_plain(), "x", call))

    report = inspect_checkpoint(path)

    found = {f.qualified_name: f for f in report.checkpoint.foreign_objects}
    assert found[name].names_code is True, found
    assert [w for w in report.warnings if w.startswith("DANGER") and f"'{name}'" in w]
    result = _cli("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "DANGER" in result.stdout and name in result.stdout


INERT = ["argparse.Namespace", "collections.OrderedDict", "numpy.dtype",
         "numpy.core.multiarray.scalar", "numpy._core.multiarray._reconstruct",
         "omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata",
         "torch.nn.modules.linear.Linear", "datetime.datetime", "torch.device"]


@pytest.mark.parametrize("name", INERT)
def test_inert_data_types_get_no_danger_line(base: Path, tmp_path: Path, name: str) -> None:
    module, attr = name.rsplit(".", 1)
    path = _zip(base, tmp_path / "inert.pth",
                with_entry(_plain(), "x", op_call(op_global(module, attr))))

    report = inspect_checkpoint(path)

    assert not [w for w in report.warnings if w.startswith("DANGER")], report.warnings
    assert all(not f.names_code for f in report.checkpoint.foreign_objects)
    assert sorted(report.checkpoint.tensors) == ["w"]


def test_allowlisted_torch_layers_are_torch_modules() -> None:
    """The allowlist names only nn.Module subclasses, by the module that defines them (what a
    pickle of ``torch.save(model)`` writes)."""
    for module_name, names in TORCH_LAYERS.items():
        module = importlib.import_module(f"torch.nn.modules.{module_name}")
        for name in names.split():
            cls = getattr(module, name)
            assert isinstance(cls, type) and issubclass(cls, nn.Module), name
            assert cls.__module__ == module.__name__, name
            assert is_inert(module.__name__, name)
    assert not is_inert("torch.nn.modules.module", "register_module_forward_hook")
    assert not is_inert("torch.nn.modules.linear", "Linear.register_forward_hook")


# ---------------------------------------------------------------------------------------------
# item 3: pickles inside pickles are read with the same restricted reader


def _nested_payload(kind: str, marker: Path) -> tuple[Any, str]:
    inner = {"evil": _Call(os.system, f"touch {marker}")}
    if kind == "raw":
        return _Call(pickle.loads, pickle.dumps(inner, protocol=2)), "pickle.loads"
    buffer = io.BytesIO()
    torch.save(inner, buffer, _use_new_zipfile_serialization=kind == "zip")
    return _Call(torch.storage._load_from_bytes, buffer.getvalue()), \
        "torch.storage._load_from_bytes"


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw"])
def test_nested_pickle_is_listed_with_what_it_names(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    blob, loader = _nested_payload(kind, marker)
    path = tmp_path / "nested.pth"
    torch.save({"w": torch.ones(2), "blob": blob}, path)

    report = inspect_checkpoint(path)

    found = {f.qualified_name: f for f in report.checkpoint.foreign_objects}
    assert found[loader].names_code is True
    system = f"{os.system.__module__}.system"
    assert found[system].names_code is True and "<nested pickle>" in found[system].where
    dangers = [w for w in report.warnings if w.startswith("DANGER")]
    assert any(f"'{loader}'" in w for w in dangers) and any(f"'{system}'" in w for w in dangers)
    assert not marker.exists()
    result = _cli("inspect", str(path), "--json")
    assert result.exit_code == 0 and not marker.exists()
    assert system in {f["name"] for f in json.loads(result.stdout)["foreign_objects"]}
    # control: a normal unpickler runs the nested payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_nested_pickles_are_bounded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob: Any = {"evil": _Call(os.system, f"touch {marker}")}
    for _ in range(6):  # six levels of _load_from_bytes around the payload
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        blob = _Call(torch.storage._load_from_bytes, buffer.getvalue())
    path = tmp_path / "deep.pth"
    torch.save({"w": torch.ones(2), "blob": blob}, path)

    ckpt = load_checkpoint(path)

    assert any("not opened: too many or too deep" in f.detail for f in ckpt.foreign_objects)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# item 3: a DANGER line survives hostile text


def test_danger_line_survives_a_5000_digit_argument(base: Path, tmp_path: Path) -> None:
    call = op_call(op_global("os", "system"), op_int(10**5000))
    path = _zip(base, tmp_path / "digits.pth", with_entry(_plain(), "x", call))

    result = _cli("inspect", str(path))

    assert result.exit_code == 0, result.output
    assert "DANGER" in result.stdout and "'os.system'" in result.stdout
    result = _cli("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    (entry,) = [f for f in json.loads(result.stdout)["foreign_objects"]
                if f["name"] == "os.system"]
    assert entry["names_code"] is True and "-bit integer>" in entry["detail"]


def test_danger_line_survives_markup_and_terminal_escapes(base: Path, tmp_path: Path) -> None:
    module, name = "[/]os\x1b[2K\x1b[1A", "system[bold red]\r"
    call = op_call(op_stack_global(module, name), op_str("[/]\x1b]0;title\x07"))
    data = with_entry(_plain(), "[red]x[/]\x1b[2J", call)
    path = _zip(base, tmp_path / "markup.pth", data)

    result = _cli("inspect", str(path), "--all")

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    (line,) = [line for line in result.stdout.splitlines() if "DANGER" in line]
    assert "'[/]os\\x1b[2K\\x1b[1A.system[bold red]\\x0d'" in line
    assert "did not" in line
