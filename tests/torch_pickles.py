"""Writing data.pkl streams the way torch.save does, with storages and views we choose."""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import torch


class StorageStub:
    """Pickled as torch's persistent id ``('storage', FloatStorage, key, 'cpu', numel)``."""

    def __init__(self, key: str = "0", numel: int = 12) -> None:
        self.key, self.numel = key, numel


class PidStub:
    """Pickled as an arbitrary persistent id."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


class TensorStub:
    """Pickled exactly as torch pickles a tensor: ``_rebuild_tensor_v2(storage, ...)``."""

    def __init__(self, storage: Any, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageStub):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        if isinstance(obj, PidStub):
            return obj.pid
        return None


def dumps(obj: Any, *, fix_imports: bool = True) -> bytes:
    """Protocol 2 like torch.save; fix_imports=True writes Python 2 names (``__builtin__``)."""
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2, fix_imports=fix_imports).dump(obj)
    return buffer.getvalue()
