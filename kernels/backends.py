"""CUDA dispatch: flash-attn when installed, PyTorch SDPA otherwise. Imported lazily by
`kernels.attention` so that nothing here is needed on a CPU machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cuda_attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [Hq, T, D], k/v [Hkv, L, D] -> [Hq, T, D]; causal in the tail."""
    T, L = q.shape[1], k.shape[1]
    mask = None
    if T > 1:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(0)
