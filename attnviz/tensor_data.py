"""Reading one tensor's values as a torch tensor (imports torch; only value paths use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnviz.arrays import ReadBudget, read_array, to_torch

if TYPE_CHECKING:
    import torch

    from attnviz.checkpoint import TensorInfo


def read_tensor(info: TensorInfo, budget: ReadBudget | None = None) -> torch.Tensor:
    """Read only the bytes this tensor's view spans, as a torch tensor of its dtype.

    Goes through ``attnviz.arrays.read_array``, the one checked read; ``Checkpoint.read_tensor``
    passes the checkpoint's budget.
    """
    return to_torch(read_array(info, budget))
