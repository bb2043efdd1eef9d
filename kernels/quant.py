"""GGUF weight types the kernels compute with, described once (the C++ side is kernels/cpu/quant.h).

A quantized matrix is kept as shipped: a uint8 tensor [out, row_bytes] whose rows are runs of
blocks, `block_elems` weights in `block_bytes` bytes each. Dense matrices are ordinary tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GgmlType:
    id: int
    name: str
    block_elems: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_elems

    def row_bytes(self, k: int) -> int:
        return k // self.block_elems * self.block_bytes


TYPES = {
    t.id: t
    for t in (
        GgmlType(0, "F32", 1, 4),
        GgmlType(1, "F16", 1, 2),
        GgmlType(2, "Q4_0", 32, 18),
        GgmlType(3, "Q4_1", 32, 20),
        GgmlType(6, "Q5_0", 32, 22),
        GgmlType(7, "Q5_1", 32, 24),
        GgmlType(8, "Q8_0", 32, 34),
        GgmlType(12, "Q4_K", 256, 144),
        GgmlType(13, "Q5_K", 256, 176),
        GgmlType(14, "Q6_K", 256, 210),
        GgmlType(30, "BF16", 1, 2),
    )
}
BY_NAME = {t.name: t for t in TYPES.values()}
DENSE_IDS = {0, 1, 30}
TORCH_DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}

# Names of the ggml types this project does not compute with, for one-line refusals.
OTHER_GGML_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def type_name(type_id: int) -> str:
    if type_id in TYPES:
        return TYPES[type_id].name
    return OTHER_GGML_NAMES.get(type_id, f"type {type_id}")


def supported_names() -> str:
    return ", ".join(t.name for t in TYPES.values())


class UnsupportedQuantType(ValueError):
    """A tensor type the kernels cannot compute with; the message is one line for the user."""

    def __init__(self, type_id: int, tensor: str = ""):
        where = f" (tensor {tensor})" if tensor else ""
        super().__init__(
            f"unsupported GGUF weight type {type_name(type_id)}{where}; supported: {supported_names()}"
        )
        self.type_id = type_id


def reference_dequantize(data: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
    """float64 [out, k] weights of a block matrix, decoded by the `gguf` package (the reference the
    kernels are tested against; slow)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if type_id in DENSE_IDS:
        return data.double()
    raw = np.ascontiguousarray(data.numpy())
    out = quants.dequantize(raw, GGMLQuantizationType(type_id))
    return torch.from_numpy(np.asarray(out, dtype=np.float64)).reshape(data.shape[0], k)
