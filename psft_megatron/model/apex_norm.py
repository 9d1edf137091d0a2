"""apex's fused RMSNorm behind the SP-capable norm of the ``local`` spec (CUDA with apex only).

megatron-core wraps apex only for LayerNorm (``FusedLayerNorm``); its RMSNorm path is
``torch.nn.RMSNorm``, which refuses sequence parallelism. :class:`ApexRMSNorm` keeps the
parameters (and their ``sequence_parallel`` marking) of
:class:`psft_megatron.model.cpu_layers.ParallelRMSNorm` and runs apex's
``fused_rms_norm_affine`` kernel: same checkpoint keys, same math.
"""

from __future__ import annotations

import torch

from psft_megatron.model.cpu_layers import ParallelRMSNorm
from psft_megatron.optional import require


class ApexRMSNorm(ParallelRMSNorm):
    """RMSNorm over the last dim with apex's fused CUDA kernel; x [..., h] on CUDA."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, eps)
        self._fused = require("apex.normalization.fused_layer_norm", "the local spec's apex RMSNorm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused.fused_rms_norm_affine(x, self.weight, self.normalized_shape, self.eps)
