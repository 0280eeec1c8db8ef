"""Outputs that would destroy inputs or files they should not touch (issue 12, item 6).

One guard (attnviz.atomic.check_output_path): never write over a file the command read,
compared by device and inode after following links, with or without --force; a dangling symlink
at the output path is an existing entry; devices, FIFOs and directories are never replaced.
And SIGTERM, like Ctrl-C, leaves no partial temp file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from attnviz.cli import app
from attnviz.errors import OutputError
from attnviz.split_export import split_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def _hf_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SAMPLES / "qkv_encoder", folder)
    return folder


def _sharded_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    state = {k: v for k, v in
             torch.load(SAMPLES / "mha_kvdim.pth", weights_only=True).items()}
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k].contiguous() for k in names[:half]}, str(folder / "a.safetensors"))
    save_file({k: state[k].contiguous() for k in names[half:]}, str(folder / "b.safetensors"))
    index = {"weight_map": {k: "a.safetensors" if i < half else "b.safetensors"
                            for i, k in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _one_error(code: int, err: str, match: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnviz: error: "), err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("force", [False, True])
def test_split_qkv_never_writes_over_the_config_it_read(tmp_path: Path, force: bool) -> None:
    folder = _hf_dir(tmp_path)
    before = _snapshot(folder)

    code, _, err = _cli("split-qkv", str(folder), "-o", str(folder / "config.json"),
                        *(["--force"] if force else []))

    _one_error(code, err, "output is the input file config.json")
    assert _snapshot(folder) == before


def test_split_qkv_never_writes_over_the_index_it_read(tmp_path: Path) -> None:
    folder = _sharded_dir(tmp_path)
    before = _snapshot(folder)

    code, _, err = _cli("split-qkv", str(folder), "-o",
                        str(folder / "model.safetensors.index.json"), "--heads", "4", "--force")

    _one_error(code, err, "output is the input file model.safetensors.index.json")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_another_name_for_an_input_is_still_the_input(tmp_path: Path, link: str) -> None:
    folder = _sharded_dir(tmp_path)
    alias = tmp_path / "alias.safetensors"
    if link == "hard":
        os.link(folder / "b.safetensors", alias)
    else:
        alias.symlink_to(folder / "b.safetensors")
    before = _snapshot(folder)

    code, _, err = _cli("split-qkv", str(folder), "-o", str(alias), "--heads", "4", "--force")

    _one_error(code, err, "output is the input file b.safetensors")
    assert _snapshot(folder) == before


def test_npz_sidecar_onto_an_input_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    folder = _hf_dir(tmp_path)
    out = tmp_path / "heads.npz"
    os.link(folder / "config.json", tmp_path / "heads.npz.json")  # the sidecar's name
    before = _snapshot(folder)

    code, _, err = _cli("split-qkv", str(folder), "-o", str(out), "--force")

    _one_error(code, err, "output is the input file config.json")
    assert not out.exists() and _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.npz.json", "model"]


def test_merge_qkv_never_writes_over_its_split_file_or_sidecar(tmp_path: Path) -> None:
    split = tmp_path / "split.npz"
    split_checkpoint(SAMPLES / "mha_kvdim.pth", split, heads=["4"])
    sidecar = tmp_path / "split.npz.json"
    before = sidecar.read_bytes()
    alias = tmp_path / "merged.safetensors"
    os.link(sidecar, alias)

    code, _, err = _cli("merge-qkv", str(split), "-o", str(alias), "--force")

    _one_error(code, err, "output is the input file split.npz.json")
    assert sidecar.read_bytes() == before


def test_a_dangling_symlink_at_the_output_is_an_existing_entry(tmp_path: Path) -> None:
    out = tmp_path / "heads.safetensors"
    target = tmp_path / "nowhere" / "file"
    out.symlink_to(target)

    code, _, err = _cli("split-qkv", str(SAMPLES / "mha_kvdim.pth"), "-o", str(out),
                        "--heads", "4")

    _one_error(code, err, "output exists (a dangling symlink)")
    code, _, err = _cli("split-qkv", str(SAMPLES / "mha_kvdim.pth"), "-o", str(out),
                        "--heads", "4", "--force")
    assert code == 0, err
    assert not out.is_symlink() and out.is_file()  # the link was replaced, nothing followed
    assert not target.parent.exists()


@pytest.mark.parametrize("kind", ["dev-null", "symlink-to-dev-null", "fifo", "directory"])
def test_non_regular_outputs_are_refused_even_with_force(tmp_path: Path, kind: str) -> None:
    if kind == "dev-null":
        out = Path("/dev/null")
    elif kind == "symlink-to-dev-null":
        out = tmp_path / "out.safetensors"
        out.symlink_to("/dev/null")
    elif kind == "fifo":
        out = tmp_path / "out.safetensors"
        os.mkfifo(out)
    else:
        out = tmp_path / "out.safetensors"
        out.mkdir()
    before = os.stat(out)

    code, _, err = _cli("split-qkv", str(SAMPLES / "mha_kvdim.pth"), "-o", str(out),
                        "--heads", "4", "--force")

    expected = {"dev-null": "is a character device, not a regular file",
                "symlink-to-dev-null": "is a character device, not a regular file",
                "fifo": "is a FIFO (named pipe), not a regular file",
                "directory": "output is a directory"}[kind]
    _one_error(code, err, expected)
    after = os.stat(out)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino,
                                                          stat.S_IFMT(before.st_mode))
    if kind != "dev-null":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_output_refuses_a_target_that_turned_special() -> None:
    from attnviz.atomic import atomic_output

    with pytest.raises(OutputError, match="character device"), atomic_output(
            Path("/dev/null")) as temp:
        temp.write_bytes(b"x")
    assert not list(Path("/dev").glob(".null.*.partial"))


_SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from attnviz import tensor_writers
    from attnviz.cli import main

    real = tensor_writers.SafetensorsStreamWriter.write
    def write(self, name, array):
        real(self, name, array)
        print("ready", flush=True)
        time.sleep(120)
    tensor_writers.SafetensorsStreamWriter.write = write
    sys.argv = ["attnviz", "split-qkv", sys.argv[1], "-o", sys.argv[2], "--heads", "4"]
    main()
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_like_ctrl_c_removes_the_partial_file(tmp_path: Path, signum: int) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITE, str(SAMPLES / "mha_kvdim.pth"),
         str(out_dir / "heads.safetensors")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    (partial,) = out_dir.iterdir()
    assert partial.name.endswith(".partial")  # mid-write

    child.send_signal(signum)
    child.wait(timeout=60)

    assert child.returncode in ({143} if signum == signal.SIGTERM else {130, 1}), \
        child.stderr.read() if child.stderr else ""
    assert list(out_dir.iterdir()) == []
