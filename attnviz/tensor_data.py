"""Reading one tensor's values from its byte range (imports torch; only value paths use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnviz.dtypes import DTYPE_SIZES
from attnviz.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

    from attnviz.checkpoint import TensorInfo


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read only the bytes this tensor's view spans, then view them with its shape and stride."""
    import torch

    dtype = getattr(torch, info.dtype)
    ref = info.ref
    if ref.numel == 0:
        return torch.empty(ref.shape, dtype=dtype)
    size = DTYPE_SIZES[info.dtype]
    span_elems = 1 + sum((n - 1) * st for n, st in zip(ref.shape, ref.stride, strict=True))
    start = info.span.offset + ref.offset * size
    length = span_elems * size
    if ref.offset * size + length > info.span.length:
        raise CorruptCheckpointError(f"tensor '{info.name}' runs past its storage",
                                     path=info.span.path)
    buffer = bytearray(length)
    with info.span.path.open("rb") as handle:
        handle.seek(start)
        if handle.readinto(buffer) != length:
            raise CorruptCheckpointError(f"tensor '{info.name}' is cut off (file truncated)",
                                         path=info.span.path, hint="download the file again")
    flat = torch.frombuffer(buffer, dtype=dtype)  # (span_elems,)
    if info.span.byteorder == "big" and size > 1:
        flat = flat.view(torch.uint8).view(-1, size).flip(1).contiguous().view(dtype).view(-1)
    view = flat.as_strided(ref.shape, ref.stride)  # (*shape)
    # a dense view owns the whole buffer; a sparse one is copied so the buffer can be freed
    return view if span_elems == ref.numel and view.is_contiguous() else view.contiguous()
