"""The drafters' output head: logits over the tokens an answer about these documents uses, not over
the whole vocabulary.

Why: the output head is the largest matrix of a small model. Qwen2.5's 0.5B has 136M of its 494M
weights there (151,936 rows), about 30% of a step's matrix time on a CPU, and the middle level (the
target's own weights reading a retrieved view of its cache) and a draft model pay that on every
token they draft, while an answer about a document draws on a small part of the vocabulary. FR-Spec (Zhao et al.,
"FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling", arXiv 2502.14856) gives a drafter a head over the most frequent tokens only. Here the
rows are:

- every token of the context (the documents, the questions, the answers so far), added as it grows;
- the first `common` ids of the vocabulary: a byte-pair vocabulary numbers its tokens in the order
  it merged them, the most frequent pieces of its training text first;
- the end-of-answer tokens.

Lossless for any choice of rows: the middle level's distribution becomes the view model's restricted
to them (its logits elsewhere are -inf before the same processors), a valid distribution q that its
drafts are drawn from and verified with (min(1, p/q) and the residual max(p - q, 0) hold for every
q; greedy verification compares with the target's argmax). A token outside the rows is never
drafted; the target still produces it. The target's own head is never restricted.

The kept rows are the same bytes as the full head's, multiplied by the same kernel: a kept token's
logit is bit for bit the full head's on the CPU kernels (tests/test_draft_head.py; on CUDA, what cuBLAS
does with fewer rows decides, and only drafts depend on it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from triforce_chat.decoding.model import Linear
from triforce_chat.decoding.models.gguf_file import release_pages

# The first ids kept whatever the context (see the module docstring): with the context's own tokens
# they cover nearly every token the default model answers with (measured in docs/performance.md,
# "The drafters' head over the context's tokens").
COMMON_TOKENS = 16384
ROWS_MULTIPLE = 16  # the int8 kernels pack tiles of 16 rows (kernels/cpu/linear_int8_tiles.h)


def copy_bytes(head: Linear, context: int) -> int:
    """The most a DraftHead of `head` holds over a context of `context` tokens: its rows (the common
    ones, at most one per context token, a tile's padding) as shipped, and their packed copy (the
    memory guard)."""
    rows = min(head.out_features, COMMON_TOKENS + context + ROWS_MULTIPLE)
    return 2 * head.nbytes * rows // max(1, head.out_features)


class DraftHead:
    """Copies of `head`'s rows for a set of token ids that only grows (`cover`).

    Two copies: the rows the head had when first used (padded to whole tiles for the int8 kernels'
    packed layout), and the rows added since, as they are (a question's and an answer's new tokens:
    tens of rows, copied again in about a millisecond when the set grows). When those pass FOLD_ROWS
    they are folded into the first copy, which takes ~20 ms: a new document does that, in its
    prefill."""

    FOLD_ROWS = 2048

    def __init__(self, head: Linear, common: int = COMMON_TOKENS, always: Iterable[int] = ()):
        if common < 0:
            raise ValueError(f"common tokens must be >= 0, not {common}")
        self.source = head
        self.vocab_size = head.out_features
        self.member = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.member[: min(common, self.vocab_size)] = True
        always = [t for t in always if 0 <= t < self.vocab_size]
        if always:
            self.member[torch.tensor(always)] = True
        self._count = int(self.member.sum())  # of member (kept, not summed over the vocabulary per call)
        self.ids = torch.empty(0, dtype=torch.long)  # the copies' rows in order: the logits' columns
        self._base: Linear | None = None
        self._base_rows = 0  # ids[:_base_rows] are the first copy's
        self._extra: Linear | None = None
        self._int8 = head.int8
        self._on_device: tuple[torch.device, Tensor, Tensor] | None = None  # ids split as the copies, per device

    @property
    def size(self) -> int:
        """Tokens the head covers."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes a forward reads for the head: its rows' share of the full head's."""
        return self.source.nbytes * self._count // max(1, self.vocab_size)

    def cover(self, tokens: Sequence[int] | Tensor) -> bool:
        """Add `tokens` (ids of the vocabulary; others are ignored); True when the set grew."""
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        t = t[(t >= 0) & (t < self.vocab_size)]
        if not t.numel():
            return False
        new = t[~self.member[t]]
        if not new.numel():
            return False
        new = new.unique()
        self.member[new] = True
        self._count += int(new.numel())
        return True

    def logits(self, x: Tensor) -> Tensor:
        """x [T, dim] (normed) -> logits [T, V] fp32: the covered ids' as the full head computes them,
        -inf for every other id."""
        self.prepare()
        if self._on_device is None or self._on_device[0] != x.device:
            ids = self.ids.to(x.device)
            self._on_device = (x.device, ids[: self._base_rows], ids[self._base_rows :])
        _, base_ids, extra_ids = self._on_device
        out = torch.full((x.shape[0], self.vocab_size), -torch.inf, dtype=torch.float32, device=x.device)
        out.index_copy_(1, base_ids, self._base(x).float())  # [T, S] into [T, V]
        if self._extra is not None:
            out.index_copy_(1, extra_ids, self._extra(x).float())
        return out

    def prepare(self) -> None:
        """Copy the rows the set gained since the last call (all of them after a change of the head's
        int8 mode, or past FOLD_ROWS). `logits` does it first; a session calls it while bringing a
        prompt in, so that an answer does not pay it."""
        if self._int8 != self.source.int8:
            self._base, self._int8 = None, self.source.int8
        if self._count == self.ids.numel() and self._base is not None:
            return
        self._on_device = None
        if self._base is None or self._count - self._base_rows > self.FOLD_ROWS:
            base = self._pad(self.member.nonzero().squeeze(1))
            self._base, self._extra, self._base_rows, self.ids = self._copy(base), None, int(base.numel()), base
            return
        held = torch.zeros_like(self.member)
        held[self.ids[: self._base_rows]] = True
        extra = (self.member & ~held).nonzero().squeeze(1)  # (unpadded: a few rows, multiplied unpacked)
        self._extra = self._copy(extra)
        self.ids = torch.cat([self.ids[: self._base_rows], extra])

    def _pad(self, ids: Tensor) -> Tensor:
        """In the int8 mode, `ids` and the next ids outside the set, up to a multiple of ROWS_MULTIPLE
        (whole tiles; the padding joins the set); `ids` as they are otherwise."""
        short = -ids.numel() % ROWS_MULTIPLE if self.source.int8 else 0
        if short:
            pad = (~self.member).nonzero().squeeze(1)[:short]
            self.member[pad] = True
            self._count += int(pad.numel())
            ids = torch.cat([ids, pad]).sort().values
        return ids

    def _copy(self, ids: Tensor) -> Linear:
        """A Linear of the head's rows `ids`, in that order, in the head's int8 mode."""
        head = self.source
        linear = Linear(head.in_features, int(ids.numel()), bias=head.has_bias)
        parts, offset = [], 0
        packed = head.int8_types if head.int8 else [0] * len(head.parts)
        for p, t, used in zip(head.parts, head.types, packed, strict=True):
            local = ids[(ids >= offset) & (ids < offset + p.shape[0])] - offset
            offset += p.shape[0]
            if local.numel():
                parts.append((p[local.to(p.device)], t))
                # where the head multiplies a packed copy, the file's pages the gather faulted in go
                # back (the kernel reads ahead around each row: ~120 MB of Qwen's 145 MB head)
                if used > 1000:
                    release_pages(p)
        bias = None if head.bias is None else head.bias[ids.to(head.bias.device)]
        linear.set_parts(parts, bias)
        linear.set_int8(head.int8)  # (packs a copy where the build packs the type)
        return linear
