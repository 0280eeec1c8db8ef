"""Unbounded resources from tiny files (issue 12, item 4), and FIFOs: every hostile input ends in
a one-line error (exit 2) or a correct result, within the budget of 1 GB peak memory and 60 s.

Each case runs through the fuzz worker (tests/fuzz_worker.py): a forked child per input whose
own peak resident memory (``wait4``) and time are measured, and which is killed as a hang past
the worker's timeout (45 s by default, inside the budget). The files are tiny; what they
declare is not.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attnviz.checkpoint
from attnviz.checkpoint import load_checkpoint
from attnviz.formats.torch_legacy import LEGACY_MAGIC

from .fuzzing import BUDGET_RSS, BUDGET_SECONDS, Worker, bundle
from .torch_pickles import StorageStub, TensorStub, dumps, op_call, op_global, op_int, with_entry

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
Files = dict[str, bytes | tuple[str, ...]]


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    supervised = Worker()
    yield supervised
    supervised.stop()


def _torch_zip(data_pkl: bytes, storage: bytes = bytes(48)) -> bytes:
    """A torch zip holding ``data_pkl`` and one storage record ``data/0``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/data/0", storage)
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


def _plain() -> bytes:
    return dumps({"w": TensorStub(StorageStub(), 0, (4, 3), (3, 1))})


def _stride0(shape: tuple[int, ...]) -> bytes:
    return _torch_zip(dumps({"w": TensorStub(StorageStub(numel=1), 0, shape,
                                             (0,) * len(shape))}))


def _mha_views(layers: int, embed: int) -> bytes:
    """``layers`` nn.MultiheadAttention layers whose every tensor is a stride-0 view of one
    element: 1.8 KB that declares ~67 MB per layer at embed 2048."""
    one = StorageStub(numel=1)
    state: dict[str, Any] = {}
    for i in range(layers):
        prefix = f"layers.{i}.self_attn."
        for name, shape in (("in_proj_weight", (3 * embed, embed)), ("in_proj_bias", (3 * embed,)),
                            ("out_proj.weight", (embed, embed)), ("out_proj.bias", (embed,))):
            state[prefix + name] = TensorStub(one, 0, shape, (0,) * len(shape))
    return _torch_zip(dumps(state))


def _legacy_with_payload(size: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3), "pad": b"x" * size}, buffer,
               _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _legacy_header_memo() -> bytes:
    """A legacy file whose first (magic number) pickle stores into memo slot 2**28."""
    magic = LEGACY_MAGIC.to_bytes(10, "little")
    return b"\x80\x02\x8a\x0a" + magic + b"r" + struct.pack("<I", 2**28) + b"."


def _globals(count: int) -> bytes:
    ops = b"".join(op_global("m", f"g{i}") + b"0" for i in range(count))
    return _torch_zip(b"\x80\x02" + ops + b"}.")


def _split_file(tmp: Path, layers_edit: Callable[[list[dict[str, Any]]], Any]) -> bytes:
    from attnviz.split_export import split_checkpoint

    out = tmp / "split.safetensors"
    split_checkpoint(SAMPLES / "mha_kvdim.pth", out, heads=["4"], force=True)
    raw = out.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    layers = json.loads(header["__metadata__"]["layers"])
    header["__metadata__"]["layers"] = json.dumps(layers_edit(layers))
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + size:]


def _heads(value: int) -> Callable[[list[dict[str, Any]]], Any]:
    def edit(layers: list[dict[str, Any]]) -> Any:
        for layer in layers:
            layer["num_heads"] = layer["num_kv_heads"] = value
        return layers

    return edit


def _nested_references(count: int) -> bytes:
    """A list of ``count`` calls of torch.storage._load_from_bytes on one memoised 1 MB
    payload: opened once, not ``count`` times."""
    inner = io.BytesIO()
    torch.save({"x": torch.zeros(1 << 18)}, inner)
    payload = inner.getvalue()
    head = (b"\x80\x02" + op_global("torch.storage", "_load_from_bytes") + b"q\x00"
            + b"B" + len(payload).to_bytes(4, "little") + payload + b"\x85q\x01" + b"00")
    calls = b"h\x00h\x01R" * count  # GET the loader, GET (payload,), REDUCE
    return _torch_zip(head + b"](" + calls + b"e.")


def _npz_split(tmp: Path) -> Files:
    """A stacked split-qkv npz output and its sidecar."""
    from attnviz.split_export import split_checkpoint

    split_checkpoint(SAMPLES / "mha_kvdim.pth", tmp / "split.npz", heads=["4"], stacked=True,
                     force=True)
    return {"split.npz": (tmp / "split.npz").read_bytes(),
            "split.npz.json": (tmp / "split.npz.json").read_bytes()}


def _npz_bomb(tmp: Path) -> Files:
    """The split npz with its first member replaced by a deflate bomb: a header declaring
    512 MB of zeros, deflated to well under 1 MB."""
    files = _npz_split(tmp)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(files["split.npz"])) as source, \
            zipfile.ZipFile(buffer, "w") as out:
        first, *rest = source.infolist()
        info = zipfile.ZipInfo(first.filename)
        info.compress_type = zipfile.ZIP_DEFLATED
        with out.open(info, "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (128 << 20,)})
            zeros = bytes(1 << 20)
            for _ in range(512):
                member.write(zeros)
        for item in rest:
            out.writestr(item, source.read(item))
    assert len(buffer.getvalue()) < 2 << 20
    return {**files, "split.npz": buffer.getvalue()}


def _prefix_chain() -> bytes:
    return _safetensors({"module." * 400_000 + "w": torch.ones(2)})  # a 2.8 MB key


def _dict_dag(levels: int = 40, width: int = 160) -> bytes:
    """Nested dicts where every dict of a level holds a tensor and all dicts of the next
    level: 1M references, each dict a candidate state_dict, ~7 MB."""
    tensor = TensorStub(StorageStub(), 0, (4, 3), (3, 1))
    level: list[dict[Any, Any]] = [{"t": tensor} for _ in range(width)]
    for _ in range(levels):
        level = [{"t": tensor, **dict(enumerate(level))} for _ in range(width)]
    return _torch_zip(dumps({"model": level[0]}))


def _shards_by_symlink(count: int = 20) -> Files:
    state = {f"t{i}": torch.ones(64) for i in range(count)}
    files: Files = {"model/s0.safetensors": _safetensors(state)}
    for i in range(1, count):
        files[f"model/s{i}.safetensors"] = ("symlink", "s0.safetensors")
    index = {"weight_map": {f"t{i}": f"s{i}.safetensors" for i in range(count)}}
    files["model/model.safetensors.index.json"] = json.dumps(index).encode()
    return files


def _safetensors(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state)


def _digits_header() -> bytes:
    header = '{"a": {"dtype": "F32", "shape": [' + "1" * 5000 + '], "data_offsets": [0, 4]}}'
    return struct.pack("<Q", len(header)) + header.encode() + bytes(4)


def _hf_dir(config: str | None = None, index: str | None = None) -> Files:
    files: Files = {"model/model.safetensors": _safetensors({"w": torch.ones(2)})}
    if config is not None:
        files["model/config.json"] = config.encode()
    if index is not None:
        files["model/model.safetensors.index.json"] = index.encode()
    return files


@dataclass
class Case:
    id: str
    files: Callable[[Path], Files]
    argv: list[str]
    match: str | None  # the one error line; None: the command succeeds
    limits: dict[str, int] = field(default_factory=dict)


INSPECT = ["inspect", "{dir}/input.pth"]
CASES = [
    Case("memo-index-2**28", lambda _: {"input.pth": _torch_zip(
        b"\x80\x02}r" + struct.pack("<I", 2**28) + b".")}, INSPECT,
        r"memo index 268435456 skips past the 0 entries"),
    Case("memo-index-in-legacy-header", lambda _: {"input.pth": _legacy_header_memo()}, INSPECT,
         r"cannot read the magic number \(pickle stream is damaged: memo index 268435456"),
    Case("bytearray-3GB-from-a-size", lambda _: {"input.pth": _torch_zip(with_entry(
        _plain(), "x", op_call(op_global("__builtin__", "bytearray"), op_int(3 * 10**9))))},
        INSPECT, r"bytearray built from int, not from bytes"),
    Case("1.2M-distinct-globals", lambda _: {"input.pth": _globals(1_200_000)}, INSPECT,
         r"pickle names over 10000 distinct globals"),
    Case("7.5M-empty-lists-in-7MB", lambda _: {"input.pth": _torch_zip(
        b"\x80\x02](" + b"]" * 7_500_000 + b"e.")}, INSPECT,
        r"pickle would build about \d+ MB of objects, over the cap of 400 MB"),
    Case("2.9M-dicts-in-16MB", lambda _: {"input.pth": _torch_zip(
        b"\x80\x02](" + b"}K\x01K\x02s" * 2_900_000 + b"e.")}, INSPECT,
        r"pickle would build about \d+ MB of objects, over the cap of 400 MB"),
    Case("a-million-and-one-containers", lambda _: {"input.pth": _torch_zip(
        b"\x80\x02](" + b"]" * 1_000_001 + b"e.")}, INSPECT,
        r"object graph has over 1000000 containers"),
    Case("stats-stride0-3GB", lambda _: {"input.pth": _stride0((750_000_000,))},
         [*INSPECT, "--stats"], r"'w' is a view that repeats its storage: its values would "
         r"take 3000000000 bytes from 4 stored"),
    Case("stats-stride0-400GB", lambda _: {"input.pth": _stride0((10**11,))},
         [*INSPECT, "--stats"], r"repeats its storage: its values would take 400000000000"),
    Case("split-qkv-stride0-views-in-total", lambda _: {"input.pth": _mha_views(6, 2048)},
         ["split-qkv", "{dir}/input.pth", "-o", "{dir}/out.safetensors", "--heads", "8"],
         r"is a view that repeats its storage.*over the cap of 268435456 bytes"),
    Case("merge-qkv-num-heads-1e9", lambda tmp: {"split.safetensors": _split_file(
        tmp, _heads(10**9))},
        ["merge-qkv", "{dir}/split.safetensors", "-o", "{dir}/out.safetensors"],
        r"layer 0 declares 1000000000 heads but the file holds \d+ tensors"),
    Case("merge-qkv-npz-deflate-bomb", _npz_bomb,
         ["merge-qkv", "{dir}/split.npz", "-o", "{dir}/out.safetensors"],
         r"npz member '.*' is compressed; split-qkv writes stored members"),
    Case("legacy-pickle-over-the-byte-cap", lambda _: {"input.pth": _legacy_with_payload(
        4 << 20)}, INSPECT, r"pickle is over 1048576 bytes",
        limits={"max_pickle_bytes": 1 << 20}),
    Case("nested-pickle-200k-references", lambda _: {"input.pth": _nested_references(200_000)},
         INSPECT, None),
    Case("prefix-stripping-2.8MB-key", lambda _: {"input.pth": _prefix_chain()}, INSPECT, None),
    Case("nested-dict-dag", lambda _: {"input.pth": _dict_dag()}, INSPECT, None),
    Case("20-symlinks-to-one-shard", lambda _: _shards_by_symlink(), ["inspect", "{dir}/model"],
         None),
    Case("fifo-checkpoint", lambda _: {"input.pth": ("fifo",)}, INSPECT,
         r"the checkpoint is a FIFO \(named pipe\), not a regular file"),
    Case("fifo-shard", lambda _: {**_shards_by_symlink(2), "model/s1.safetensors": ("fifo",)},
         ["inspect", "{dir}/model"], r"shard 's1.safetensors' is a FIFO"),
    Case("symlink-to-dev-zero", lambda _: {"input.pth": ("symlink", "/dev/zero")}, INSPECT,
         r"is a character device, not a regular file"),
    Case("fifo-npz-sidecar", lambda tmp: {**_npz_split(tmp), "split.npz.json": ("fifo",)},
         ["merge-qkv", "{dir}/split.npz", "-o", "{dir}/out.safetensors"],
         r"split sidecar is a FIFO"),
    Case("5000-digit-int-in-safetensors-header", lambda _: {"input.pth": _digits_header()},
         INSPECT, r"header holds an integer of 5000 digits \(over 64 bits\)"),
    Case("5000-digit-int-in-config", lambda _: _hf_dir(
        config='{"num_attention_heads": ' + "7" * 5000 + "}"), ["inspect", "{dir}/model"],
        r"config.json: cannot read config: it holds an integer of 5000 digits"),
    Case("5000-digit-int-in-shard-index", lambda _: _hf_dir(
        index='{"metadata": {"total_size": ' + "7" * 5000 + '}, "weight_map": {}}'),
        ["inspect", "{dir}/model"], r"cannot read shard index: it holds an integer of 5000"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_stays_within_budget(worker: Worker, tmp_path: Path, case: Case) -> None:
    files = case.files(tmp_path)

    report = worker.run("bundle", bundle(files, case.argv, case.limits))

    assert report["outcome"] == ("ok" if case.match is None else "error"), report
    if case.match is not None:
        assert report["error"].startswith("attnviz: error: "), report
        assert re.search(case.match, report["error"]), report["error"]
    assert not report["leftovers"], report
    assert report["peak_rss"] <= BUDGET_RSS, report
    assert report["seconds"] <= BUDGET_SECONDS, report


def test_symlinked_shards_are_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in _shards_by_symlink().items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.symlink_to(content[1])
    parsed: list[Path] = []
    reader = attnviz.checkpoint.READERS["safetensors"]

    def counting(path: Path) -> Any:
        parsed.append(path)
        return reader(path)

    monkeypatch.setitem(attnviz.checkpoint.READERS, "safetensors", counting)

    ckpt = load_checkpoint(folder)

    assert parsed == [folder / "s0.safetensors"]
    assert sorted(ckpt.tensors) == sorted(f"t{i}" for i in range(20))
    assert torch.equal(ckpt.read_tensor("t7"), torch.ones(64))
    assert (folder / "s19.safetensors") in ckpt.inputs  # every name is guarded as an input


def test_split_qkv_total_cap_counts_every_layer(tmp_path: Path) -> None:
    """One stride-0 layer fits the cap, five do not: the cap is on the total, not per tensor."""
    from attnviz.errors import LimitExceededError
    from attnviz.split_export import split_checkpoint

    one, five = tmp_path / "one.pth", tmp_path / "five.pth"
    one.write_bytes(_mha_views(1, 2048))
    five.write_bytes(_mha_views(5, 2048))
    split_checkpoint(one, tmp_path / "one.safetensors", heads=["8"])
    assert load_checkpoint(tmp_path / "one.safetensors").tensors
    with pytest.raises(LimitExceededError, match=r"repeats its storage"):
        split_checkpoint(five, tmp_path / "five.safetensors", heads=["8"])
    assert not (tmp_path / "five.safetensors").exists()
