"""Fuzzing the reader and the CLI with mutated real checkpoints (see tests/fuzzing.py).

Single files go to ``inspect`` (library and CLI) and ``split-qkv``; multi-file inputs
(bundles) cover what else a user hands attnviz: split-qkv outputs given to ``merge-qkv``
(safetensors with metadata, npz with its sidecar JSON) and HF-style model directories (config,
shard index, shards). CI runs a short budget; a longer run is
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

from .fuzzing import REGRESSIONS, Worker, bundle, check, mutate, mutate_json

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


class Bundles(dict[str, tuple[dict[str, bytes], list[str]]]):
    """Multi-file inputs by name: (files, CLI arguments)."""

    def __repr__(self) -> str:
        return f"Bundles({sorted(self)})"


def _with_layers(split: bytes, layers: bytes) -> bytes:
    """A split safetensors file with its metadata's 'layers' replaced (data offsets are relative,
    so the header may change length)."""
    size = int.from_bytes(split[:8], "little")
    header = json.loads(split[8:8 + size])
    header["__metadata__"]["layers"] = layers.decode("utf-8", "replace")
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + split[8 + size:]


def _layers_of(split: bytes) -> bytes:
    size = int.from_bytes(split[:8], "little")
    return str(json.loads(split[8:8 + size])["__metadata__"]["layers"]).encode()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """split-qkv outputs (safetensors; npz with sidecar) and an HF directory with two shards."""
    from attnviz.split_export import split_checkpoint

    folder = tmp_path_factory.mktemp("bundles")
    source = SAMPLES / "mha_kvdim.pth"
    split_checkpoint(source, folder / "split.safetensors", heads=["4"])
    split_checkpoint(source, folder / "split.npz", heads=["4"], stacked=True)
    torch.manual_seed(1)
    state = {f"encoder.layer.0.attention.self.{n}.{p}": torch.randn(16, 16) if p == "weight"
             else torch.randn(16) for n in ("query", "key", "value") for p in ("weight", "bias")}
    first, second = dict(list(state.items())[:3]), dict(list(state.items())[3:])
    save_file(first, str(folder / "model-1.safetensors"))
    save_file(second, str(folder / "model-2.safetensors"))
    index = {"metadata": {"total_size": 6 * 16 * 17 * 4},
             "weight_map": {**{k: "model-1.safetensors" for k in first},
                            **{k: "model-2.safetensors" for k in second}}}
    config = {"model_type": "bert", "num_attention_heads": 4, "hidden_size": 16,
              "num_hidden_layers": 1, "architectures": ["BertModel"]}
    hf = {"model/config.json": json.dumps(config).encode(),
          "model/model.safetensors.index.json": json.dumps(index).encode(),
          "model/model-1.safetensors": (folder / "model-1.safetensors").read_bytes(),
          "model/model-2.safetensors": (folder / "model-2.safetensors").read_bytes()}
    merge = ["merge-qkv", "{dir}/split.safetensors", "-o", "{dir}/out.safetensors", "--force"]
    merge_npz = ["merge-qkv", "{dir}/split.npz", "-o", "{dir}/out.safetensors", "--force"]
    return Bundles({
        "merge-safetensors": ({"split.safetensors": (folder / "split.safetensors").read_bytes()},
                              merge),
        "merge-npz": ({"split.npz": (folder / "split.npz").read_bytes(),
                       "split.npz.json": (folder / "split.npz.json").read_bytes()}, merge_npz),
        "hf-inspect": (hf, ["inspect", "{dir}/model", "--json"]),
        "hf-split": (hf, ["split-qkv", "{dir}/model", "-o", "{dir}/out.safetensors", "--force"]),
    })


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_split_files_and_model_directories_end_in_success_or_a_documented_error(
        worker: Worker, bundles: Bundles, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(bundles)), label="bundle")
    files, argv = bundles[name]
    member = data.draw(st.sampled_from(sorted(files)), label="file")
    position = data.draw(st.integers(0, 2**31), label="position")
    kind = data.draw(st.sampled_from([*KINDS, "json", "layers"]), label="mutation")
    original = files[member]
    if kind == "layers" and member.endswith(".safetensors") and name.startswith("merge"):
        layers = mutate_json(_layers_of(original), position, data.draw(st.integers(0, 99)),
                             data.draw(st.integers(0, 4)))
        mutated = _with_layers(original, layers)
    elif kind == "layers" and member.endswith(".json") and name == "merge-npz":
        sidecar = json.loads(original)
        sidecar["layers"] = mutate_json(sidecar["layers"].encode(), position,
                                        data.draw(st.integers(0, 99)),
                                        data.draw(st.integers(0, 4))).decode("utf-8", "replace")
        mutated = json.dumps(sidecar).encode()
    elif kind in {"json", "layers"}:
        mutated = mutate_json(original, position, data.draw(st.integers(0, 99)),
                              data.draw(st.integers(0, 4)))
    else:
        mutated = mutate(original, kind, position, data.draw(st.integers(0, 64)),
                         data.draw(st.binary(min_size=1, max_size=16)))
    report = check(worker, "bundle", bundle({**files, member: mutated}, argv))
    assert report["outcome"] in {"ok", "error"}, report
    assert not report.get("leftovers"), report


def test_unmutated_bundles_succeed(worker: Worker, bundles: Bundles) -> None:
    for name, (files, argv) in bundles.items():
        report = check(worker, "bundle", bundle(files, argv))
        assert report["outcome"] == "ok", (name, report)


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


def test_the_worker_measures_each_input_and_catches_a_hanging_one(worker: Worker) -> None:
    """Per-input peak memory is that input's own (a fresh child each time), and a child that
    outlives the timeout is killed and reported as a hang while the worker carries on."""
    import tests.fuzzing as fuzzing

    small = worker.run("probe", json.dumps({"allocate": 0}).encode())
    big = worker.run("probe", json.dumps({"allocate": 300 << 20}).encode())
    again = worker.run("probe", json.dumps({"allocate": 0}).encode())
    assert small["outcome"] == big["outcome"] == again["outcome"] == "ok"
    assert big["peak_rss"] >= small["peak_rss"] + (250 << 20)  # 300 MB touched, baselines vary
    assert again["peak_rss"] < small["peak_rss"] + (100 << 20)  # not inherited from the last
    assert not fuzzing.over_budget(big)
    assert fuzzing.over_budget({**big, "peak_rss": fuzzing.BUDGET_RSS + 1})
    hung = worker.run("probe", json.dumps({"sleep": fuzzing.TIMEOUT + 5}).encode())
    assert hung["outcome"] == "hang"
    assert worker.run("probe", b"{}")["outcome"] == "ok"


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
