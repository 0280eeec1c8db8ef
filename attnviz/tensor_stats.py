"""Value statistics for ``inspect --stats``: read one tensor at a time (numpy, no torch), count
NaN/Inf, summarise the finite values. Non-finite values are reported, never a crash."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnviz.checkpoint import Checkpoint


@dataclass(frozen=True)
class TensorStats:
    name: str
    nan: int
    inf: int
    min: float | None  # over the finite values; None when there are none
    max: float | None
    mean: float | None
    std: float | None


def _as_float(array: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any] | None:
    if dtype == "bfloat16":  # the top half of a float32
        return (array.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if array.dtype.names:  # float8: no arithmetic here
        return None
    return array


def tensor_stats(checkpoint: Checkpoint, names: Iterable[str]) -> list[TensorStats]:
    results = []
    for name in names:
        info = checkpoint.tensors[name]
        values = _as_float(checkpoint.read_array(name), info.dtype)
        if values is None or values.dtype == np.bool_:
            continue
        flat = values.reshape(-1)
        if flat.dtype.kind in "fc":
            nan = int(np.isnan(flat).sum())
            inf = int(np.isinf(flat).sum())
            finite = flat[np.isfinite(flat)] if nan or inf else flat
        else:
            nan = inf = 0
            finite = flat
        finite = finite.real.astype(np.float64) if finite.size else finite
        if finite.size:
            results.append(TensorStats(name, nan, inf, float(finite.min()), float(finite.max()),
                                       float(finite.mean()), float(finite.std())))
        else:
            results.append(TensorStats(name, nan, inf, None, None, None, None))
    return results
