"""The bottom level of the speculation hierarchy: cheap proposers for the middle level to verify.

Two kinds, one protocol:

* SuffixDrafter (default, decoding/suffix.py) and NGramDrafter: prompt lookup. Chats about a long
  document quote it, and answers repeat their own phrases, so "what followed the last time these
  tokens appeared" is a free and often long draft. The suffix automaton finds the longest such match
  and how many different tokens followed it; the n-gram index sees at most n_max tokens back.
* ModelDrafter: a small model sharing the target's tokenizer, over a StreamingLLM cache (sinks plus
  a recent window), so its per-token cost stays flat however long the document is.
* LookupFirstDrafter (what `--draft MODEL` builds): both. The suffix lookup proposes where the context
  repeats itself (quotes: free and long), the model everywhere else.

The verifier above accepts or rejects every drafted token, so nothing here can change what the
chat produces: drafters only change how fast it comes.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from triforce_chat.decoding.config import LOOKUPS, drafter_label
from triforce_chat.decoding.draft_head import COMMON_TOKENS, DraftHead
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.streaming import StreamingCache
from triforce_chat.decoding.suffix import SuffixDrafter

if TYPE_CHECKING:
    from triforce_chat.decoding.model import Transformer
    from triforce_chat.decoding.models.loading import LoadedModel

Progress = Callable[[int, int], None]  # (done, total)
Cancel = Callable[[], bool]


class DrafterError(ValueError):
    """A drafter cannot be built or used as asked; the message is one line meant for the user."""


class Drafter(Protocol):
    """What the decoder asks of a bottom drafter. It holds its own copy of the context (`tokens`),
    extended and truncated by the decoder; proposals follow the end of that copy.

    Two kinds of proposal, named because they cost differently: `propose_lookup` is free (an index
    lookup: empty when nothing backs a draft) and `propose_model` pays a forward per token (empty for
    a drafter without a model, `drafts_with_model` False). The decoder takes a lookup's drafts
    whenever there are some and asks a model only where its cost model expects the drafts to pay."""

    name: str
    drafts_with_model: bool
    last_match: int  # how far back the match behind the last lookup proposal reached (0: none)
    last_branches: int  # distinct tokens that followed that match before (0: not known)

    @property
    def length(self) -> int: ...

    @property
    def tokens(self) -> Sequence[int]: ...

    def extend(self, tokens: Sequence[int]) -> None: ...

    def truncate(self, length: int) -> None: ...

    def propose_lookup(self, k: int) -> tuple[list[int], Tensor | None]: ...

    def propose_model(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]: ...

    def propose_alternative(self, k: int) -> list[int]:
        """After a lookup proposal: up to k tokens of a second continuation of the same match, whose
        first token differs from the proposal's (a tree window's other branch); empty where the
        drafter knows none (only the suffix lookup knows which matches branched)."""
        ...

    def propose(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        """The lookup's drafts, else the model's."""
        ...

    def catch_up(self, progress: Progress | None = None, should_cancel: Cancel | None = None) -> bool:
        """Run a draft model over the tokens it recorded but did not run yet, with progress
        (tokens run, tokens to run) and a cancel check between pieces; False when a cancel stopped
        it (the rest runs at the next proposal). Nothing to do for a lookup."""
        ...

    def figures(self) -> dict[str, int]: ...


# -- n-gram lookup ------------------------------------------------------------------------------------


class NGramDrafter:
    """Prompt lookup over everything the chat has seen.

    Index, per n in [n_min, n_max]: `head[n]` maps an n-gram (its token ids packed into one int,
    exact, no hashing) to the end position of its latest occurrence, and `prev[n][e]` links the
    n-gram ending at e to the previous end position of the same n-gram (-1: none). A lookup needs
    only prev[n][L-1] (the latest *earlier* occurrence of the context's last n tokens): O(n_max).
    extend() is one dict update per n and token; truncate() walks the removed positions backwards,
    restoring each head from its prev link, so the index equals one built from scratch.
    """

    name = "ngram"
    drafts_with_model = False
    last_match = 0  # tokens of context the last proposal's match reached back (up to REACH; 0: none)
    last_branches = 0  # not known to an n-gram index

    def __init__(self, n_max: int = 4, n_min: int = 1, vocab_size: int | None = None):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.bits = max(1, (vocab_size - 1).bit_length()) if vocab_size else 20
        self._tokens = array("i")  # [L] context token ids
        self._ns = range(n_min, n_max + 1)
        self._head: dict[int, dict[int, int]] = {n: {} for n in self._ns}
        self._prev: dict[int, array] = {n: array("i") for n in self._ns}  # each [L]

    @property
    def tokens(self) -> Sequence[int]:
        return self._tokens

    @property
    def length(self) -> int:
        return len(self._tokens)

    def _key(self, end: int, n: int) -> int:
        """The n-gram ending at `end`, packed with the most recent token in the low bits."""
        toks, bits, key = self._tokens, self.bits, 0
        for i in range(n):
            key |= toks[end - i] << (bits * i)
        return key

    def extend(self, tokens: Sequence[int]) -> None:
        toks, bits, limit = self._tokens, self.bits, 1 << self.bits
        heads, prevs, n_min, n_max = self._head, self._prev, self.n_min, self.n_max
        for tok in tokens:
            tok = int(tok)
            if not 0 <= tok < limit:
                raise ValueError(f"token id {tok} is outside the n-gram index's vocabulary of {limit}")
            end = len(toks)
            toks.append(tok)
            key = 0
            for n in range(1, n_max + 1):
                if n <= end + 1:
                    key |= toks[end - n + 1] << (bits * (n - 1))
                if n < n_min:
                    continue
                if n > end + 1:  # no n-gram ends here yet
                    prevs[n].append(-1)
                    continue
                head = heads[n]
                prevs[n].append(head.get(key, -1))
                head[key] = end

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot truncate {len(self._tokens)} tokens to {length}")
        for end in range(len(self._tokens) - 1, length - 1, -1):
            for n in self._ns:
                if n > end + 1:
                    continue
                key, before = self._key(end, n), self._prev[n][end]
                if before >= 0:
                    self._head[n][key] = before
                else:
                    del self._head[n][key]
        del self._tokens[length:]
        for n in self._ns:
            del self._prev[n][length:]

    # Among the CANDIDATES latest earlier occurrences of the matched n-gram, follow the one whose match
    # reaches furthest back (up to REACH tokens). Why: documents repeat templates ("X is led by Y,
    # who joined in Z"); the latest "who joined in" continues another paragraph than the one being
    # quoted, while the occurrence that also matches the names before it continues the right one.
    CANDIDATES = 16
    REACH = 32

    def propose_lookup(self, k: int) -> tuple[list[int], Tensor | None]:
        return self.propose(k)

    def propose_model(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        return [], None

    def propose_alternative(self, k: int) -> list[int]:
        return []  # the index does not know which matches branched

    def propose(self, k: int, sampler: Sampler | None = None) -> tuple[list[int], Tensor | None]:
        """Tokens after the earlier occurrence of the longest matching suffix (n <= n_max) whose match
        extends furthest back, the latest on ties (a point mass: q is None). Never reaches past the
        end of the known context."""
        toks = self._tokens
        L = len(toks)
        self.last_match = 0
        if k <= 0 or L == 0:
            return [], None
        for n in range(self.n_max, self.n_min - 1, -1):
            prev = self._prev[n]
            end = prev[L - 1]
            if end < 0:
                continue
            best, best_len = end, -1
            for _ in range(self.CANDIDATES):
                m = n
                while m < self.REACH and end - m >= 0 and toks[end - m] == toks[L - 1 - m]:
                    m += 1
                if m > best_len:
                    best, best_len = end, m
                end = prev[end]
                if end < 0 or best_len >= self.REACH:
                    break
            self.last_match = best_len
            return toks[best + 1 : min(best + 1 + k, L)].tolist(), None
        return [], None

    def match_length(self) -> int:
        """n of the suffix the next proposal would follow (0: none), for tuning and stats."""
        L = len(self._tokens)
        for n in range(self.n_max, self.n_min - 1, -1):
            if L and self._prev[n][L - 1] >= 0:
                return n
        return 0

    def catch_up(self, progress: Progress | None = None, should_cancel: Cancel | None = None) -> bool:
        """Nothing to run: the index is current after every extend."""
        return True

    def figures(self) -> dict[str, int]:
        return {"ngram_index_entries": sum(len(h) for h in self._head.values())}

    @property
    def index_bytes(self) -> int:
        """Approximate memory of the index (dicts, their keys and values, the arrays)."""
        import sys

        total = sys.getsizeof(self._tokens)
        for n in self._ns:
            head = self._head[n]
            total += sys.getsizeof(head) + sys.getsizeof(self._prev[n])
            total += sum(sys.getsizeof(key) + sys.getsizeof(pos) for key, pos in head.items())
        return total


# -- small draft model over a StreamingLLM cache -------------------------------------------------------


class ModelDrafter:
    """A small model drafting with a sink + sliding-window cache.

    State: the context token ids, a StreamingCache holding keys/values of cache.length <= length of
    them (it lags only after a truncate: the missing tokens are run at the next extend or propose,
    together with whatever comes next), and the logits after the last context token.

    Exactness: keys/values depend only on the token prefix (see streaming.py), so with
    rebuild="exact" any sequence of extend/truncate gives the same state as a fresh drafter fed the
    final context. Truncating by up to `slack` tokens (more, until the next compaction) is O(1). A
    deeper rollback past evicted keys has to re-prefill: rebuild="exact" re-runs the last
    n_layers * (window - 1) tokens, exactly the reach of a window through the layers (for a 30-layer
    draft with a 1024 window that is ~30K tokens, tens of seconds on a CPU); rebuild="window"
    re-runs only the last window + slack tokens, whose deeper layers then saw a shorter past, and
    catches up on a lag longer than that the same way (`_skip_ahead`: a document's prefill).
    Drafts then differ slightly from a fresh drafter's, which costs nothing in correctness since
    every draft is verified.

    restrict_head: the model's logits over the context's tokens, the vocabulary's most common ones
    and `eos_ids` only (decoding/draft_head.py; a 0.5B's head is about 30% of its step), a valid draft
    distribution like any other.
    """

    def __init__(
        self, model: Transformer, *, name: str = "draft", sink: int = 4, window: int = 1024, slack: int = 64,
        chunk: int = 256, target_vocab: int | None = None, max_context: int | None = None,
        headroom: int | None = None, rebuild: str = "exact", restrict_head: bool = True,
        eos_ids: Iterable[int] = (), head_common: int = COMMON_TOKENS,
    ):
        if rebuild not in ("exact", "window"):
            raise ValueError(f"rebuild must be 'exact' or 'window', not {rebuild!r}")
        if max_context is not None and max_context > model.max_len:
            raise DrafterError(
                f"draft model {name} covers {model.max_len} positions, fewer than the target's context of "
                f"{max_context} tokens"
            )
        self.model = model
        self.name = name
        self.rebuild = rebuild
        self.chunk = max(1, chunk)
        self.vocab = model.args.vocab_size
        self.target_vocab = target_vocab or self.vocab
        self.cache = StreamingCache.for_model(model, sink=sink, window=window, slack=slack, headroom=headroom)
        self._tokens = array("i")  # [L]
        self._logits: Tensor | None = None  # [V_draft] fp32 after the last context token, if current
        # (head_common: the vocabulary's first ids the head keeps; the tests take fewer than their vocabulary)
        self.head = DraftHead(model.output, head_common, eos_ids) if restrict_head else None  # grows with the context

    drafts_with_model = True
    last_match = 0
    last_branches = 0

    @property
    def tokens(self) -> Sequence[int]:
        return self._tokens

    def propose_lookup(self, k: int) -> tuple[list[int], Tensor | None]:
        return [], None

    def propose_model(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        return self.propose(k, sampler)

    def propose_alternative(self, k: int) -> list[int]:
        return []

    @property
    def length(self) -> int:
        return len(self._tokens)

    def extend(self, tokens: Sequence[int], run: bool = True) -> None:
        """Append context tokens. run=False only records them: the model runs over them at the
        next propose or catch_up, all at once (a chunked prefill instead of many small forwards)."""
        if len(tokens) == 0:
            return
        new = [int(t) for t in tokens]
        if len(self._tokens) + len(new) > self.model.max_len:
            raise DrafterError(
                f"draft model {self.name} covers {self.model.max_len} positions; the context would reach "
                f"{len(self._tokens) + len(new)}"
            )
        if min(new) < 0 or max(new) >= self.vocab:
            raise DrafterError(f"token id outside the draft model {self.name}'s vocabulary of {self.vocab}")
        self._tokens.extend(new)
        if self.head is not None:
            self.head.cover(new)
        if run:
            self._sync()
        else:
            self._logits = None

    def catch_up(self, progress: Progress | None = None, should_cancel: Cancel | None = None) -> bool:
        """Run the model over the tokens recorded but not run yet (see Drafter.catch_up)."""
        return self._sync(progress, should_cancel)

    def _sync(self, progress: Progress | None = None, should_cancel: Cancel | None = None) -> bool:
        """Run the model over the context tokens the cache does not hold yet (chunked prefill), from
        where `_skip_ahead` says. False when should_cancel stopped it between chunks."""
        start, end = self.cache.length, len(self._tokens)
        if start == end:
            return True
        start = self._skip_ahead(start, end)
        dev = self.model.device
        for lo in range(start, end, self.chunk):
            if should_cancel is not None and should_cancel():
                return False
            hi = min(lo + self.chunk, end)
            ids = torch.tensor(self._tokens[lo:hi].tolist(), dtype=torch.long, device=dev)  # [T]
            out = self.model(ids, self.cache, logits="last" if hi == end else "none", head=self.head)
            if progress is not None:
                progress(hi - start, end - start)
        self._logits = out[0]  # [V]
        return True

    def _skip_ahead(self, start: int, end: int) -> int:
        """Where a catch-up from `start` to `end` begins. With rebuild="window", a lag longer than the
        window and slack runs only its last window + slack tokens (after the sinks, if not yet run),
        as a deep rollback does: the last token's window then holds exactly the keys it would
        have, and only what deeper layers would have carried from further back is missing. Why: a
        draft model reading a 29K-token book whole took 91 s of a 1.5B target's 369 s prefill (Zen
        4, 2 threads), and again at every reopening (the document cache does not keep its cache),
        to draft a few tokens per answer; the window is a few seconds. Drafts may differ, which
        costs nothing in correctness (every draft is verified)."""
        cache = self.cache
        if self.rebuild != "window" or end - start <= cache.keep:
            return start
        if start < cache.sink:  # the sinks first: every later query reads them
            ids = torch.tensor(self._tokens[start : cache.sink].tolist(), dtype=torch.long, device=self.model.device)
            self.model(ids, cache, logits="none")
            start = cache.sink
        skip_to = end - cache.keep
        if skip_to <= start:
            return start
        cache.restart(skip_to, approximate=True)
        return skip_to

    def truncate(self, length: int) -> None:
        L = len(self._tokens)
        if not 0 <= length <= L:
            raise ValueError(f"cannot truncate {L} tokens to {length}")
        if length == L:
            return
        del self._tokens[length:]
        self._logits = None
        # keep the cache one token short: the last token is run again (by itself or with the next
        # extend) to give its logits, instead of storing logits for every rollback point
        target = max(0, length - 1)
        if self.cache.length <= target:
            return
        if self.cache.can_truncate(target):
            self.cache.truncate(target)
        else:
            window, sink = self.cache.window, self.cache.sink
            exact = self.rebuild == "exact"
            # "window": one window plus slack, so rolling back up to slack right after stays O(1)
            start = target - (self.model.args.n_layers * (window - 1) if exact else window + self.cache.slack)
            self.cache.restart(start if start > sink else min(sink, target), approximate=not exact)

    def next_logits(self) -> Tensor | None:
        """Draft logits [V_draft] fp32 after the last context token (None on an empty context)."""
        if not self._tokens:
            return None
        if self._logits is None:
            self._sync()
        return self._logits

    def _fit(self, logits: Tensor) -> Tensor:
        """Draft logits [V_draft] -> [V_target]: models sharing a tokenizer may pad their
        embedding tables differently; ids past the tokenizer are never proposed."""
        if self.vocab == self.target_vocab:
            return logits
        if self.vocab > self.target_vocab:
            return logits[: self.target_vocab]
        pad = logits.new_full((self.target_vocab - self.vocab,), float("-inf"))
        return torch.cat([logits, pad])

    def propose(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        """k autoregressive draft steps; q rows [n, V_target] are sampler.probs of the draft logits,
        each row processed with its own prefix (the sampler's history, then the drafts before it),
        as the verifiers process theirs (None when greedy: the draft is then a point mass at the
        argmax of the penalized logits). The cache is rolled back before returning."""
        L = len(self._tokens)
        # positions L .. L+k-1 must exist; more than slack + 1 steps could evict keys we roll back to
        k = min(k, self.model.max_len - L, self.cache.slack + 1)
        if k <= 0 or L == 0:
            return [], None
        logits = self.next_logits()
        assert logits is not None
        drafts: list[int] = []
        rows: list[Tensor] = []
        dev = self.model.device
        for i in range(k):
            row = self._fit(logits)
            if sampler.greedy:
                tok = int(sampler.scores(row, drafts).argmax())
            else:
                probs = sampler.probs(row, drafts)  # [V_target]
                tok = sampler.sample(probs)
                rows.append(probs)
            drafts.append(tok)
            if i + 1 < k:
                logits = self.model(torch.tensor([tok], device=dev), self.cache, logits="last", head=self.head)[0]
        self.cache.truncate(L)
        return drafts, (torch.stack(rows) if rows else None)

    def figures(self) -> dict[str, int]:
        L, sink, window = len(self._tokens), self.cache.sink, self.cache.window
        sizes = {"drafter_cache_bytes": self.cache.allocated_bytes,
                 "drafter_weight_bytes": getattr(self.model, "weight_bytes", 0)}
        if L <= sink:
            return {"drafter_sink_tokens": L, "drafter_recent_tokens": 0, **sizes}
        return {"drafter_sink_tokens": sink, "drafter_recent_tokens": L - max(sink, L - window), **sizes}


# -- both bottoms ---------------------------------------------------------------------------------------


class LookupFirstDrafter:
    """The lookup where the context repeats itself, the draft model everywhere else.

    Why: quoting a document, the lookup proposes long runs that are right at no cost, and a small
    model would spend a forward per token to propose the same; on new prose the lookup's guesses
    are poor and the model's are good. A lookup needs the context's last `min_match` tokens to have
    occurred before (1-gram matches say little about what comes next).

    Exactness: which proposer drafts is decided before the verifier looks at anything (here by the
    context alone; the decoder may also skip the model on its cost model's timings), so each
    round's proposal distribution is fixed before its draws (the lookup's is a point mass): the
    speculative-sampling argument holds round by round. The model records context tokens without
    running them (extend run=False) and catches up, in chunks, when it is next asked to draft: a
    quote of 200 tokens costs it one prefill of 200 tokens, not 200 forwards.
    """

    def __init__(self, lookup: SuffixDrafter | NGramDrafter, model: ModelDrafter, min_match: int = 2):
        self.lookup, self.model, self.min_match = lookup, model, min_match
        self.name = drafter_label(model.name)
        self.rounds = {"lookup": 0, "model": 0}

    drafts_with_model = True

    @property
    def last_match(self) -> int:
        return self.lookup.last_match

    @property
    def last_branches(self) -> int:
        return self.lookup.last_branches

    @property
    def tokens(self) -> Sequence[int]:
        return self.lookup.tokens

    @property
    def length(self) -> int:
        return self.lookup.length

    def extend(self, tokens: Sequence[int]) -> None:
        self.lookup.extend(tokens)
        self.model.extend(tokens, run=False)

    def truncate(self, length: int) -> None:
        self.lookup.truncate(length)
        self.model.truncate(length)

    def catch_up(self, progress: Progress | None = None, should_cancel: Cancel | None = None) -> bool:
        return self.model.catch_up(progress, should_cancel)

    def propose_lookup(self, k: int) -> tuple[list[int], Tensor | None]:
        """The lookup's drafts when the context's last min_match tokens occurred before, else none."""
        # a proposal of 0 tokens still tells the lookup that nothing backed this round (last_match 0)
        drafts, q = self.lookup.propose(k if self.lookup.match_length() >= self.min_match else 0)
        if drafts:
            self.rounds["lookup"] += 1
        return drafts, q

    def propose_model(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        self.rounds["model"] += 1
        return self.model.propose(k, sampler)

    def propose_alternative(self, k: int) -> list[int]:
        return self.lookup.propose_alternative(k)

    def propose(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        drafts, q = self.propose_lookup(k)
        return (drafts, q) if drafts else self.propose_model(k, sampler)

    def figures(self) -> dict[str, int]:
        return {**self.lookup.figures(), **self.model.figures(),
                "drafter_lookup_rounds": self.rounds["lookup"], "drafter_model_rounds": self.rounds["model"]}


def draft_model_of(drafter: object) -> ModelDrafter | None:
    """The draft model part of a bottom drafter (None for the lookup alone): what costs memory."""
    if isinstance(drafter, LookupFirstDrafter):
        return drafter.model
    return drafter if isinstance(drafter, ModelDrafter) else None


def sync_context(
    drafter: Drafter, context: list[int], step: int | None = None,
    progress: Progress | None = None, should_cancel: Cancel | None = None,
) -> bool:
    """Make the drafter hold `context`, keeping the common prefix with what it holds. step: bring a
    draft model up to date now, with progress over the tokens it runs and a cancel check between
    its pieces (a prefill, not the first answer's first round); the context goes to the drafter in
    pieces of that many tokens first, so that a draft model that records without running (the
    LookupFirstDrafter's) sees the whole lag at once and may skip ahead (ModelDrafter._skip_ahead).
    Returns False when a cancel stopped it early: the drafter then holds a prefix of `context` (a
    cancel while extending) or all of it with its model behind (while catching up), which the next
    proposal completes."""
    held = drafter.tokens
    limit = min(len(held), len(context))
    if held[:limit] == array("i", context[:limit]):  # the usual case, compared in C: no loop at 30K tokens
        n = limit
    else:
        n = 0
        while held[n] == context[n]:
            n += 1
    if n < len(held):
        drafter.truncate(n)
    todo = context[n:]
    if not step:
        drafter.extend(todo)
        return True
    for done in range(0, len(todo), step):
        if should_cancel is not None and should_cancel():
            return False
        piece = todo[done : done + step]
        if isinstance(drafter, ModelDrafter):
            drafter.extend(piece, run=False)
        else:
            drafter.extend(piece)
    return drafter.catch_up(progress, should_cancel)


# -- construction ---------------------------------------------------------------------------------------


def check_shared_vocab(draft_id: str, draft_tokenizer, target_tokenizer, draft_vocab: int) -> None:
    """Raise DrafterError unless both tokenizers map every string to the same id and the draft
    model can embed every id."""
    a, b = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if a != b:
        if len(a) != len(b):
            detail = f"{len(a)} vs {len(b)} tokens"
        else:
            tok = min((t for t in a if a[t] != b.get(t)), key=a.__getitem__)  # lowest differing id
            there = f"id {b[tok]}" if tok in b else "absent"
            detail = f"token {tok!r} is id {a[tok]} in the draft, {there} in the target"
        raise DrafterError(f"draft model {draft_id} does not share the target's tokenizer: {detail}")
    top = max(a.values(), default=-1)
    if top >= draft_vocab:
        raise DrafterError(
            f"draft model {draft_id} does not share the target's tokenizer: id {top} is past its "
            f"embedding table of {draft_vocab}"
        )


def make_drafter(
    spec: str, target: LoadedModel, *, sink: int = 4, window: int = 1024, slack: int = 256, chunk: int = 256,
    n_min: int = 1, n_max: int = 4, device: str | None = None, extend_context: bool = True,
    rebuild: str = "window", log=None, restrict_head: bool = True,
) -> Drafter:
    """"suffix" -> SuffixDrafter, "ngram" -> NGramDrafter; anything else is a model spec for
    load_model (same dtype as the target), drafting behind the suffix lookup (LookupFirstDrafter).
    extend_context: stretch a draft model with fewer positions than the target's context with YaRN
    (draft quality only) instead of refusing it. slack 256 keeps regenerating a short reply an O(1)
    rollback; rebuild="window" bounds the cost of deeper ones (see ModelDrafter); restrict_head: the
    draft model's logits over part of the vocabulary (see ModelDrafter)."""
    vocab = max(target.model.args.vocab_size, len(target.tokenizer))
    if spec in LOOKUPS:
        return SuffixDrafter(vocab_size=vocab) if spec == "suffix" else NGramDrafter(n_max, n_min, vocab)
    from triforce_chat.decoding.models.loading import load_model

    context = target.model.max_len
    # weights as shipped (a GGUF draft keeps its blocks); no self-check: drafts are always verified
    loaded = load_model(
        spec, dtype=None, device=device or str(target.model.device),
        context=context if extend_context else None, log=log, check=False,
    )
    check_shared_vocab(loaded.model_id, loaded.tokenizer, target.tokenizer, loaded.model.args.vocab_size)
    model = ModelDrafter(
        loaded.model, name=loaded.model_id, sink=sink, window=window, slack=slack, chunk=chunk,
        target_vocab=target.model.args.vocab_size, max_context=context, rebuild=rebuild, restrict_head=restrict_head,
        eos_ids=target.eos_ids,
    )
    return LookupFirstDrafter(SuffixDrafter(vocab_size=vocab), model)


__all__ = [
    "Drafter", "DrafterError", "LookupFirstDrafter", "ModelDrafter", "NGramDrafter", "StreamingCache",
    "SuffixDrafter",
    "check_shared_vocab", "draft_model_of", "make_drafter", "sync_context",
]
