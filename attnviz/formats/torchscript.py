"""TorchScript archives (``torch.jit.save``): their weights, read without their code.

An archive holds ``code/`` (the modules' TorchScript source), ``constants.pkl`` and a
``data.pkl`` whose objects are ``__torch__.*`` classes (resolved by ``torch.jit.load`` against
that code) with their attributes as state: parameters, buffers, submodules, plain values.
Nothing under ``code/`` is read, compiled or run, and ``constants.pkl`` is never opened:
``data.pkl`` goes through the restricted unpickler with a stricter allowlist, exactly the
globals torch's own TorchScript unpickler accepts (torch/csrc/jit/serialization/unpickler.cpp,
``Unpickler::readGlobal``). Any other global is refused outright: no real archive names one.
Each ``__torch__`` class becomes an inert ``ScriptObject`` placeholder, which refuses
arguments, calls, items and a second state; tensor names come from attribute paths
(``visual.transformer.resblocks.0.attn.in_proj_weight``), as ``state_dict()`` would give them.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from attnviz.dtypes import TORCH_STORAGE_DTYPES
from attnviz.errors import CorruptCheckpointError, UnsupportedCheckpointError
from attnviz.formats.base import LoadedFile
from attnviz.formats.detect import TORCHSCRIPT
from attnviz.formats.placeholders import ForeignObject
from attnviz.formats.safe_pickle import RestrictedUnpickler, TensorRef
from attnviz.formats.torch_zip import HINT, load_zip_pickle, storage_spans
from attnviz.limits import LIMITS
from attnviz.text_safety import safe_repr

FORMAT = TORCHSCRIPT
MAX_NAME = 300  # characters of a TorchScript class or attribute name
_MODULE = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*", re.ASCII)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_ATTRIBUTE = re.compile(r"[A-Za-z0-9_]+", re.ASCII)  # ModuleList children are '0', '1', ...
# What torch's TorchScript unpickler resolves itself, besides ``__torch__`` classes. The
# rest of its list (quantized and sparse tensors, RRefs, __main__.TensorID of pre-1.4
# archives) needs machinery attnviz does not have: refused as unsupported, by name.
_PLAIN = frozenset({("torch._utils", "_rebuild_tensor_v2"),
                    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"),
                    ("collections", "OrderedDict"), ("builtins", "complex"), ("torch", "device")})
_UNSUPPORTED = {("torch._utils", "_rebuild_qtensor"): "quantized tensors",
                ("torch._utils", "_rebuild_sparse_tensor"): "sparse tensors",
                ("torch.distributed.rpc", "rref"): "distributed RRefs",
                ("__main__", "TensorID"): "a pre-1.4 tensor table",
                ("__main__", "IntList"): "a pre-1.4 tensor table",
                ("torch.jit._pickle", "build_tensor_from_id"): "a pre-1.4 tensor table"}


def _checked_list(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise CorruptCheckpointError(f"a TorchScript list builder got {type(data).__name__}")
    return data


def _restore_type_tag(value: Any, type_text: Any) -> Any:
    """``torch.jit._pickle.restore_type_tag``: the type string matters only to TorchScript."""
    if not isinstance(type_text, str):
        raise CorruptCheckpointError("restore_type_tag without a type string")
    return value


_JIT_BUILDERS = {("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
                 **{("torch.jit._pickle", f"build_{kind}list"): _checked_list
                    for kind in ("int", "tensor", "double", "bool")}}


class ScriptObject(ForeignObject):
    """An object of a ``__torch__`` class: built empty (NEWOBJ with no arguments), then given
    its attributes as one state (BUILD). Anything else a pickle tries on it is refused."""

    __slots__ = ()
    names_code = False  # a TorchScript type name; attnviz never resolves or compiles it

    def __new__(cls, *args: Any, **kwargs: Any) -> ScriptObject:
        if args or kwargs:
            raise CorruptCheckpointError(f"TorchScript object '{cls.qualified_name()[:200]}' "
                                         "built with arguments; TorchScript builds them empty")
        instance = super().__new__(cls)
        assert isinstance(instance, ScriptObject)
        return instance

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise CorruptCheckpointError(f"TorchScript object '{self.qualified_name()[:200]}' "
                                         "given its state twice")
        self.state = state

    def _refuse(self, what: str) -> NoReturn:
        raise CorruptCheckpointError(f"the pickle {what} TorchScript object "
                                     f"'{self.qualified_name()[:200]}'; TorchScript never does")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("calls")

    def append(self, item: Any) -> NoReturn:
        self._refuse("appends to")

    def extend(self, items: Any) -> NoReturn:
        self._refuse("appends to")

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        self._refuse("sets items on")


def _script_class(module: str, name: str) -> type[ScriptObject]:
    attrs = {"__slots__": (), "foreign_module": module, "foreign_name": name}
    return type("ScriptObject", (ScriptObject,), attrs)  # the name is data, never copied in


class ScriptUnpickler(RestrictedUnpickler):
    """The restricted unpickler, with TorchScript's allowlist and nothing beyond it."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            if (len(module) + len(name) > MAX_NAME or not _MODULE.fullmatch(module)
                    or not _IDENTIFIER.fullmatch(name)):
                raise CorruptCheckpointError(f"TorchScript class name "
                                             f"{safe_repr(f'{module}.{name}', 160)} is not a "
                                             "dotted identifier")
            return self.placeholder((module, name), lambda: _script_class(module, name))
        key = (module, name)
        if key in _JIT_BUILDERS:
            return _JIT_BUILDERS[key]
        if key in _PLAIN or (module == "torch" and name in TORCH_STORAGE_DTYPES):
            return super().find_class(module, name)
        if key in _UNSUPPORTED:
            raise UnsupportedCheckpointError(
                f"this TorchScript archive holds {_UNSUPPORTED[key]}, which attnviz cannot read",
                hint="save a state_dict with torch.save(model.state_dict(), 'model.pth')")
        raise CorruptCheckpointError(
            f"the TorchScript data.pkl names the global {safe_repr(f'{module}.{name}', 160)}, "
            "which no TorchScript archive holds; refused, nothing was run",
            hint="do not load this file with torch.jit.load or torch.load")


def _as_modules(root: Any, path: Path) -> ScriptObject:
    """Give every ScriptObject the shape of a pickled ``nn.Module`` (``_parameters``,
    ``_modules``), so ``containers`` names its tensors by attribute path, as it does for
    ``torch.save(model)``. TorchScript keeps parameters and buffers as plain attributes (which
    is which is written only in ``code/``), so every tensor attribute is a parameter here.

    Iterative, each object once (a cycle or a shared submodule cannot multiply the work).
    """
    if not isinstance(root, ScriptObject):
        raise CorruptCheckpointError(f"the TorchScript data.pkl holds {type(root).__name__}, "
                                     "not a module object", path=path, hint=HINT)
    seen: set[int] = set()
    stack: list[tuple[ScriptObject, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > LIMITS.max_walk_nodes:
            raise CorruptCheckpointError(f"over {LIMITS.max_walk_nodes} TorchScript objects",
                                         path=path, hint="raise ATTNVIZ_MAX_WALK_NODES")
        state = node.state
        if not isinstance(state, Mapping):  # custom classes with __getstate__: no attributes
            continue
        tensors: dict[str, TensorRef] = {}
        children: dict[str, ScriptObject] = {}
        plain: dict[str, Any] = {}
        for key, value in state.items():
            if not isinstance(key, str) or len(key) > MAX_NAME or not _ATTRIBUTE.fullmatch(key):
                raise CorruptCheckpointError(
                    f"TorchScript object '{node.qualified_name()[:200]}' has an attribute named "
                    f"{safe_repr(key, 80)}, not an identifier", path=path, hint=HINT)
            if isinstance(value, TensorRef):
                tensors[key] = value
            elif isinstance(value, ScriptObject):
                children[key] = value
                if depth < LIMITS.max_depth:
                    stack.append((value, depth + 1))
            elif isinstance(value, str | int | float | bool | type(None)):
                plain[key] = value
        node.state = {**plain, "_parameters": tensors, "_buffers": {}, "_modules": children}
    return root


def script_classes(root: Any) -> dict[str, str]:
    """Module path -> TorchScript class name (``'visual.transformer.resblocks.0.mlp.gelu'``
    -> ``'__torch__.model.QuickGELU'``) for a root read here: evidence about the model (an
    activation's class) that its tensors cannot give. Each object once, within the depth cap.
    """
    found: dict[str, str] = {}
    if not isinstance(root, ScriptObject):
        return found
    seen: set[int] = set()
    stack: list[tuple[ScriptObject, str, int]] = [(root, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found[where] = node.qualified_name()
        children = node.state.get("_modules") if isinstance(node.state, Mapping) else None
        if isinstance(children, Mapping) and depth < LIMITS.max_depth:
            stack += [(child, f"{where}.{key}" if where else key, depth + 1)
                      for key, child in children.items() if isinstance(child, ScriptObject)]
    return found


def read_script_archive(path: Path, archive: zipfile.ZipFile, file_size: int) -> LoadedFile:
    """The weights of a TorchScript archive; its code is counted, never read."""
    names = archive.namelist()
    if any(n.endswith("/model.json") for n in names):
        raise UnsupportedCheckpointError(
            "this is a TorchScript archive in the pre-1.4 format (model.json), which attnviz "
            "does not read", path=path,
            hint="re-save the weights with torch.save(model.state_dict(), 'model.pth')")
    root, foreign, storages, byteorder, prefix = load_zip_pickle(
        archive, path, file_size, unpickler=ScriptUnpickler)
    root = _as_modules(root, path)
    spans = storage_spans(path, archive, storages, prefix, byteorder, file_size)
    code = sum(1 for n in names if n.startswith(f"{prefix}code/") and not n.endswith("/"))
    metadata = {"torchscript": f"{code} code file(s) under code/, not compiled and not run; "
                               "weights read from data.pkl"}
    return LoadedFile(path, FORMAT, root, spans, foreign, metadata)
