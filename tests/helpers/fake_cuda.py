"""A stand-in for a CUDA tensor on a machine without one, where only its device, dtype and
shape are read (``seqmodels.backends``' decisions)."""
from __future__ import annotations

import torch


class FakeCuda:
    def __init__(self, *shape: int, dtype: torch.dtype = torch.float32) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda", 0)
