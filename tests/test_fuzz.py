"""Fuzzing the reader and the CLI with mutated real checkpoints (see tests/fuzzing.py).

CI runs a short budget; a longer run is
``ATTNVIZ_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/test_fuzz.py -q -s`` (prints the figures).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from .fuzzing import REGRESSIONS, Worker, check, mutate

EXAMPLES = int(os.environ.get("ATTNVIZ_FUZZ_EXAMPLES", "120"))
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
KINDS = ["flip", "truncate", "splice", "duplicate", "header", "tail"]


class Corpus(dict[str, bytes]):
    """Sample files by name; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Corpus({sorted(self)})"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Small real checkpoints of every container the reader handles."""
    folder = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4).state_dict()
    torch.save(mha, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": {f"enc.{k}": v for k, v in mha.items()},
                "args": argparse.Namespace(nheads=4)}, folder / "wrapped.pth")
    save_file({k: v.to(torch.bfloat16) for k, v in mha.items()}, str(folder / "bf16.safetensors"))
    files = Corpus({p.name: p.read_bytes() for p in folder.iterdir()})
    files["mha_kvdim.pth"] = (SAMPLES / "mha_kvdim.pth").read_bytes()
    files["qkv_encoder.safetensors"] = (SAMPLES / "qkv_encoder" / "model.safetensors").read_bytes()
    return files


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    supervised = Worker()
    yield supervised
    supervised.stop()
    summary = dict(sorted(supervised.stats.items()))
    (tmp_path_factory.getbasetemp() / "fuzz-stats.json").write_text(json.dumps(summary))
    print(f"\nfuzz figures: {json.dumps(summary, indent=1)}")


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_checkpoints_end_in_success_or_a_documented_error(
        worker: Worker, corpus: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(corpus)), label="sample")
    kind = data.draw(st.sampled_from(KINDS), label="mutation")
    payload = mutate(corpus[name], kind, data.draw(st.integers(0, 2**31), label="position"),
                     data.draw(st.integers(0, 64), label="length"),
                     data.draw(st.binary(min_size=1, max_size=16), label="bytes"))
    target = data.draw(st.sampled_from(["inspect", "cli", "split"]), label="target")
    report = check(worker, target, payload)
    assert report["outcome"] in {"ok", "error"}, report
    assert not report.get("leftovers"), report


def test_unmutated_corpus_is_read(worker: Worker, corpus: dict[str, bytes]) -> None:
    for name, payload in corpus.items():
        assert check(worker, "inspect", payload)["outcome"] == "ok", name


def test_the_harness_catches_a_hang_and_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor really reports what it exists to catch (a worker killed, a timeout)."""
    import tests.fuzzing as fuzzing

    dead = Worker()
    monkeypatch.setattr(fuzzing, "TIMEOUT", 0.5)
    process = dead._start()
    process.kill()
    process.wait()
    dead.process = process  # a dead worker is restarted, not trusted
    assert dead.run("inspect", b"")["outcome"] in {"error", "ok"}
    dead.stop()
    silent = Worker()
    monkeypatch.setattr(fuzzing.Worker, "_start", lambda self: _sleeper(self))
    assert silent.run("inspect", b"x")["outcome"] == "hang"


def _sleeper(worker: Worker) -> object:
    import subprocess
    import sys

    worker.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return worker.process


@pytest.mark.parametrize("case", sorted(p.name for p in REGRESSIONS.glob("*.bin")) or ["none"])
def test_kept_regressions_stay_fixed(worker: Worker, case: str) -> None:
    if case == "none":
        pytest.skip("no regression inputs kept yet")
    target = case.split("-")[0]
    report = worker.run(target, (REGRESSIONS / case).read_bytes())
    assert report["outcome"] in {"ok", "error"} and not report.get("leftovers"), report
