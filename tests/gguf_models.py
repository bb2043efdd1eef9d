"""Small random GGUF models for tests, written with the `gguf` package the way llama.cpp's converter
lays them out (Llama q/k rows permuted for RoPE on adjacent pairs; Qwen2 with q/k/v biases).

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks come from `gguf.quants.quantize`; the k-quants (which it
cannot produce) are random bytes with sane f16 scale fields: every bit pattern of their codes is a
valid block, and the kernels are compared against the package's own decoding of the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

KQUANT_SCALE_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
UNSUPPORTED = {"Q2_K": (), "Q3_K": ()}  # random bytes: only ever refused, never computed


def random_blocks(type_name: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, row_bytes] of a quantized matrix of n rows of k weights."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in KQUANT_SCALE_FIELDS or type_name in UNSUPPORTED:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nb = k // block_elems
        raw = rng.integers(0, 256, size=(n, nb, block_bytes), dtype=np.uint8)
        for off in KQUANT_SCALE_FIELDS.get(type_name, ()):
            scales = rng.uniform(0.002, 0.01, size=(n, nb)).astype(np.float16)
            raw[:, :, off : off + 2] = scales.view(np.uint8).reshape(n, nb, 2)
        return raw.reshape(n, nb * block_bytes)
    w = rng.normal(0, 0.2, size=(n, k)).astype(np.float32)
    return np.ascontiguousarray(quants.quantize(w, qtype))


def _permute_for_adjacent_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within a head, rows (i, i + D/2) become adjacent."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path, arch: str = "llama", *, dim: int = 256, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
    head_dim: int = 64, ffn: int = 512, vocab: int = 300, context: int = 2048, qtype: str = "Q4_0",
    qtypes: dict[str, str] | None = None, seed: int = 0, tied: bool = False,
) -> Path:
    """A random model; `qtype` for every matrix unless `qtypes` names one (by GGUF tensor suffix,
    e.g. {"attn_v": "Q8_0", "ffn_down": "Q6_K", "token_embd": "F32"}). Norms are F32."""
    import gguf

    rng = np.random.default_rng(seed)
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)

    def matrix(name: str, n: int, k: int, permute_heads: int = 0) -> None:
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        t = qtypes.get(kind, qtype)
        if t in ("F32", "F16"):
            data = rng.normal(0, 0.2, size=(n, k)).astype(np.float32 if t == "F32" else np.float16)
            if permute_heads:
                data = _permute_for_adjacent_rope(data, permute_heads)
            w.add_tensor(name, data)
            return
        data = random_blocks(t, n, k, rng)
        if permute_heads:
            data = _permute_for_adjacent_rope(data, permute_heads)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t])

    def vector(name: str, n: int, scale: float = 0.1, base: float = 0.0) -> None:
        w.add_tensor(name, (base + rng.normal(0, scale, size=n)).astype(np.float32))

    permute = arch == "llama"
    matrix("token_embd.weight", vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", dim, base=1.0)
        vector(p + "ffn_norm.weight", dim, base=1.0)
        matrix(p + "attn_q.weight", n_heads * head_dim, dim, n_heads if permute else 0)
        matrix(p + "attn_k.weight", n_kv_heads * head_dim, dim, n_kv_heads if permute else 0)
        matrix(p + "attn_v.weight", n_kv_heads * head_dim, dim)
        if arch == "qwen2":
            vector(p + "attn_q.bias", n_heads * head_dim, 0.5)
            vector(p + "attn_k.bias", n_kv_heads * head_dim, 0.5)
            vector(p + "attn_v.bias", n_kv_heads * head_dim, 0.5)
        matrix(p + "attn_output.weight", dim, n_heads * head_dim)
        matrix(p + "ffn_gate.weight", ffn, dim)
        matrix(p + "ffn_up.weight", ffn, dim)
        matrix(p + "ffn_down.weight", dim, ffn)
    vector("output_norm.weight", dim, base=1.0)
    if not tied:
        matrix("output.weight", vocab, dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load(path: Path, **kwargs):
    """Our model over the file's blocks (no tokenizer, no self-check)."""
    from triforce_chat.decoding.models.loading import load_gguf_weights

    return load_gguf_weights(path, **kwargs)


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def resident_pages(t: torch.Tensor) -> int:
    """How many of the whole pages under `t` this process has mapped in (/proc/self/pagemap's
    present bit; mincore would count the page cache, which the release leaves alone)."""
    import mmap
    import struct

    page = mmap.PAGESIZE
    first = -(-t.data_ptr() // page)
    n = (t.data_ptr() + t.numel() * t.element_size()) // page - first
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        entries = struct.unpack(f"<{n}Q", f.read(8 * n))
    return sum(e >> 63 & 1 for e in entries)
