"""Shared fixtures: writing hand-built state_dicts the way each library stores them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

SaveFn = Callable[..., Path]


def write_checkpoint(
    directory: Path,
    state_dict: Mapping[str, torch.Tensor] | Any,
    name: str = "model.safetensors",
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a state_dict (safetensors when the name says so, else torch.save) and a config."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def save(tmp_path: Path) -> SaveFn:
    counter = iter(range(1_000_000))

    def _save(state_dict: Any, name: str = "model.safetensors",
              config: Mapping[str, Any] | None = None) -> Path:
        return write_checkpoint(tmp_path / f"ckpt{next(counter)}", state_dict, name, config)

    return _save


def pytest_configure(config: Any) -> None:
    """Under pytest-xdist each worker is one process per core: one torch thread each, so that
    two workers do not fight over the same cores."""
    import os

    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The conformance zoo's matrix, when the zoo ran."""
    import sys

    matrix = sys.modules.get("tests.zoo.matrix")
    cases = sys.modules.get("tests.zoo.cases")
    if matrix is None or cases is None or not matrix.RESULTS:
        return
    for line in matrix.terminal(cases.CASES):
        terminalreporter.write_line(line)
