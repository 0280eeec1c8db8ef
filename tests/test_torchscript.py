"""TorchScript archives: weights read through the restricted unpickler, code never run.

A CLIP-style tower written like OpenAI's (nn.MultiheadAttention, QuickGELU) is traced with
torch.jit.trace and saved here; attnviz must read the same tensors as its state_dict and draw
the same maps (which equal HF's: its weights come from an HF CLIP converted in the test).
Hostile archives are that real archive with a hand-written data.pkl.
"""

from __future__ import annotations

import collections
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import CLIPVisionModelWithProjection
from typer.testing import CliRunner

from attnviz.checkpoint import load_checkpoint
from attnviz.cli import app
from attnviz.errors import CorruptCheckpointError, LimitExceededError, UnsupportedCheckpointError
from attnviz.models.clip_visual import clip_attention_maps
from tests.conftest import write_checkpoint
from tests.test_clip_swin import clip_to_openai, hf_clip
from tests.torch_pickles import (
    op_call,
    op_global,
    op_int,
    op_stack_global,
    op_str,
    with_entry,
)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict([
            ("c_fc", nn.Linear(width, 2 * width)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(2 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.resblocks(x)
        return out


class VisionTransformer(nn.Module):
    """OpenAI CLIP's tower, sequence-first as clip/model.py runs it."""

    def __init__(self, width: int = 128, patch: int = 8, grid: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, 2, width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, grid**2, width)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # LND inside, as OpenAI
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = VisionTransformer()
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images) * self.logit_scale.exp()


Traced = tuple[Path, CLIP, dict[str, torch.Tensor], CLIPVisionModelWithProjection]


def traced_clip(tmp_path: Path) -> Traced:
    """An OpenAI-style archive whose weights are a converted HF CLIP (the HF oracle)."""
    hf = hf_clip()
    model = CLIP().eval()
    state = clip_to_openai(hf) | {"logit_scale": torch.tensor(0.5)}
    model.load_state_dict(state)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer / deprecation warnings
        torch.jit.trace(model, torch.randn(1, 3, 32, 32)).save(str(path))
    return path, model, state, hf


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Traced:
    """One traced archive for the tests that only read it or copy it."""
    torch.manual_seed(0)
    return traced_clip(tmp_path_factory.mktemp("archive"))


def test_archive_tensors_equal_the_state_dict(archive: Traced) -> None:
    path, model, _, _ = archive
    ckpt = load_checkpoint(path)
    assert ckpt.format == "torchscript"
    expected = model.state_dict()
    assert list(ckpt.tensors) == list(expected)  # attribute paths, in state_dict order
    for name, tensor in expected.items():
        assert_close(ckpt.read_tensor(name), tensor, rtol=0, atol=0)
    assert "not compiled and not run" in ckpt.metadata["torchscript"]
    assert not any(f.names_code for f in ckpt.foreign_objects)
    assert any(f.qualified_name.endswith("QuickGELU") for f in ckpt.foreign_objects)


def test_archive_maps_equal_state_dict_maps_and_hf(tmp_path: Path, archive: Traced) -> None:
    path, model, state, hf = archive
    plain = write_checkpoint(tmp_path / "sd", state, "clip.pth")
    images = torch.randn(2, 3, 32, 32)
    maps, output, spec = clip_attention_maps(load_checkpoint(path), images)
    assert spec.activation == "quick_gelu" and "TorchScript class" in spec.activation_source
    same, same_output, _ = clip_attention_maps(load_checkpoint(plain), images,
                                               activation="quick_gelu")
    assert list(maps) == list(same) == [f"visual.transformer.resblocks.{i}.attn" for i in (0, 1)]
    for name in maps:
        assert_close(maps[name], same[name], rtol=0, atol=0)
    with torch.no_grad():
        attentions = hf(pixel_values=images, output_attentions=True).attentions
        assert_close(output, model.visual(images), atol=1e-5, rtol=1e-4)
    for name, expected in zip(maps, attentions, strict=True):
        assert_close(maps[name], expected, atol=1e-5, rtol=1e-4)
    assert_close(output, same_output, rtol=0, atol=0)


def test_inspect_says_torchscript_and_code_not_run(archive: Traced) -> None:
    path = archive[0]
    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "torchscript" in result.output
    assert "code was not run" in result.output
    assert "DANGER" not in result.output
    assert "visual.transformer.resblocks.1.attn" in result.output


def test_scripted_module_is_read_too(tmp_path: Path) -> None:
    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) + 1

    module = Scripted()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.format == "torchscript" and list(ckpt.tensors) == ["proj.weight", "proj.bias"]
    assert_close(ckpt.read_tensor("proj.weight"), module.proj.weight.detach())


# ---------------------------------------------------------------------------------------------
# hostile archives: the traced archive with its data.pkl replaced


def _with_data_pkl(source: Path, target: Path, data: bytes, *,
                   extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, data if info.filename.endswith("/data.pkl")
                         else old.read(info))
        for name, payload in (extra or {}).items():
            new.writestr(name, payload)
    return target


def _empty_object(cls_ops: bytes) -> bytes:
    """``cls.__new__(cls)``, as TorchScript writes its objects (GLOBAL, (), NEWOBJ)."""
    return cls_ops + b")\x81"


def _script_object(cls_ops: bytes, state_ops: bytes) -> bytes:
    """An object, then BUILD with ``state_ops`` (a dict)."""
    return _empty_object(cls_ops) + state_ops + b"b"


def _dict(*items: tuple[str, bytes]) -> bytes:
    return b"}(" + b"".join(op_str(k) + v for k, v in items) + b"u"


def _storage(key: str, numel: int) -> bytes:
    return b"(" + op_str("storage") + op_global("torch", "FloatStorage") + op_str(key) + \
        op_str("cpu") + op_int(numel) + b"tQ"


def _tensor(key: str, numel: int, size: int) -> bytes:
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), _storage(key, numel),
                   op_int(0), b"(" + op_int(size) + b"t", b"(" + op_int(1) + b"t", b"\x89",
                   op_call(op_global("collections", "OrderedDict")))


def _pkl(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _storage_numel(path: Path, key: str) -> int:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(f"/data/{key}")]
        return archive.getinfo(name).file_size // 4


ROOT = op_global("__torch__", "Root")


@pytest.mark.parametrize(("name", "body", "error", "match"), [
    ("os-system", op_call(op_global("os", "system"), op_str("touch PWNED")),
     CorruptCheckpointError, r"names the global 'os\.system'.*refused, nothing was run"),
    ("builtins-eval-in-state", _script_object(ROOT, _dict(("x", op_call(
        op_global("builtins", "eval"), op_str("1"))))),
     CorruptCheckpointError, r"names the global 'builtins\.eval'"),
    ("torch-load-nested", op_call(op_global("torch.storage", "_load_from_bytes"), op_str("x")),
     CorruptCheckpointError, r"names the global 'torch\.storage\._load_from_bytes'"),
    ("torch-script-name-with-arguments", op_call(op_global("__torch__.builtins", "eval"),
                                                 op_str("__import__('os')")),
     CorruptCheckpointError, r"'__torch__\.builtins\.eval' built with arguments"),
    ("torch-script-odd-name", _empty_object(op_stack_global("__torch__.a;b", "C")),
     CorruptCheckpointError, r"is not a dotted identifier"),
    ("torch-script-dotted-class", _empty_object(op_stack_global("__torch__", "os.system")),
     CorruptCheckpointError, r"is not a dotted identifier"),
    ("torch-script-object-called", op_call(_empty_object(ROOT), op_str("ls")),
     CorruptCheckpointError, r"calls TorchScript object '__torch__\.Root'"),
    ("state-twice", _script_object(ROOT, _dict()) + _dict() + b"b",
     CorruptCheckpointError, r"given its state twice"),
    ("attribute-not-an-identifier", _script_object(ROOT, _dict(("../x", op_int(1)))),
     CorruptCheckpointError, r"attribute named '\.\./x', not an identifier"),
    ("root-not-a-module", _dict(("w", op_int(1))),
     CorruptCheckpointError, r"holds dict, not a module object"),
    ("quantized-tensor", op_call(op_global("torch._utils", "_rebuild_qtensor")),
     UnsupportedCheckpointError, r"holds quantized tensors"),
    ("list-builder-with-a-string", op_call(op_global("torch.jit._pickle", "build_intlist"),
                                           op_str("x")),
     CorruptCheckpointError, r"list builder got str"),
    ("huge-view-on-small-storage", lambda src: _script_object(ROOT, _dict(
        ("w", _tensor("0", _storage_numel(src, "0"), 10**12)))),
     (CorruptCheckpointError, LimitExceededError), r"runs past its storage|over the cap"),
    ("storage-declares-more-than-its-record", _script_object(ROOT, _dict(
        ("w", _tensor("0", 10**15, 4)))),
     CorruptCheckpointError, r"storage record 'data/0' holds \d+ bytes, its tensors need"),
])
def test_hostile_data_pkl_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     archive: Traced, name: str,
                                     body: bytes | Callable[[Path], bytes],
                                     error: type[Exception], match: str) -> None:
    source = archive[0]
    data = _pkl(body(source) if callable(body) else body)
    path = _with_data_pkl(source, tmp_path / f"{name}.pt", data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_cycles_and_shared_modules_are_read_once(tmp_path: Path, archive: Traced) -> None:
    """A module that holds itself, and a child under two names: finite, each module read once
    (by its first path, as attnviz reads every pickled module graph)."""
    source = archive[0]
    numel = _storage_numel(source, "0")
    child = _script_object(op_global("__torch__", "Child"),
                           _dict(("w", _tensor("0", numel, numel))))
    body = (ROOT + b")\x81q\x00"  # the root, memoised as 0
            + b"}(" + op_str("self") + b"h\x00"  # an attribute pointing back at the root
            + op_str("a") + child + b"q\x01" + op_str("b") + b"h\x01" + b"ub")
    path = _with_data_pkl(source, tmp_path / "cycle.pt", _pkl(body))
    ckpt = load_checkpoint(path)
    assert list(ckpt.tensors) == ["a.w"]


def test_archive_with_legacy_model_json_is_unsupported(tmp_path: Path, archive: Traced
                                                         ) -> None:
    source = archive[0]
    with zipfile.ZipFile(source) as zipped:
        prefix = zipped.namelist()[0].split("/")[0]
    path = _with_data_pkl(source, tmp_path / "legacy.pt", _pkl(_empty_object(ROOT)),
                          extra={f"{prefix}/model.json": b"{}"})
    with pytest.raises(UnsupportedCheckpointError, match=r"pre-1\.4 format \(model\.json\)"):
        load_checkpoint(path)


def test_torchscript_inside_a_pickle_is_still_not_read(tmp_path: Path, archive: Traced
                                                         ) -> None:
    """A nested payload (``torch.storage._load_from_bytes(archive bytes)``) that is a
    TorchScript archive is listed as refused, never read as weights."""
    source = archive[0]
    outer = write_checkpoint(tmp_path / "outer", {"w": torch.ones(2)}, "outer.pth")
    with zipfile.ZipFile(outer) as zipped:
        data = zipped.read("outer/data.pkl")
    payload = source.read_bytes()
    blob = b"B" + len(payload).to_bytes(4, "little") + payload  # BINBYTES
    hostile = with_entry(data, "blob", op_call(
        op_global("torch.storage", "_load_from_bytes"), blob))
    path = _with_data_pkl(outer, tmp_path / "nested.pth", hostile)
    ckpt = load_checkpoint(path)
    assert list(ckpt.tensors) == ["w"]
    nested = [f for f in ckpt.foreign_objects if "_load_from_bytes" in f.qualified_name]
    assert nested and all(f.names_code for f in nested)
    assert any("TorchScript archive" in f.detail for f in nested), nested
