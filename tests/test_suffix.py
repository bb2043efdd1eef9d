"""The suffix-automaton drafter against a brute-force scan, through random extends and truncates,
and its rollback against an automaton built from scratch over the same tokens."""

from __future__ import annotations

import random

import pytest

from triforce_chat.decoding.suffix import SuffixDrafter


def earlier_ends(tokens: list[int], m: int) -> list[int]:
    """Every position before the last token where the last m tokens also end."""
    L, suffix = len(tokens), tokens[len(tokens) - m :]
    return [e for e in range(m - 1, L - 1) if tokens[e - m + 1 : e + 1] == suffix]


def reference_match(tokens: list[int]) -> tuple[int, int, int]:
    """(length, end, branches) of the longest suffix that also ends before the last token, the
    latest such end of its last REACH tokens, and the distinct tokens after its ends, by scanning."""
    m = 0
    while m + 1 < len(tokens) and earlier_ends(tokens, m + 1):
        m += 1
    if not m:
        return 0, -1, 0
    branches = len({tokens[e + 1] for e in earlier_ends(tokens, m)})
    return m, earlier_ends(tokens, min(m, SuffixDrafter.REACH))[-1], branches


def reference_alternative(tokens: list[int], match: int, k: int) -> list[int]:
    """A tree's second branch by scanning: among the earlier ends of the match's last REACH tokens,
    latest first, after the one the proposal follows, the first whose next token differs from the
    proposal's (within ALTERNATIVE_SCAN of them), and up to k tokens from there."""
    ends = earlier_ends(tokens, min(match, SuffixDrafter.REACH))[::-1]
    first = tokens[ends[0] + 1]
    for e in ends[1 : 1 + SuffixDrafter.ALTERNATIVE_SCAN]:
        if tokens[e + 1] != first:
            return tokens[e + 1 : e + 1 + k]
    return []


def automaton(d: SuffixDrafter):
    return (d._tokens.tolist(), bytes(d._bytes), d._len.tolist(), d._link.tolist(), [dict(n) for n in d._next],
            d._last)


# token ids whose plain int32 bytes overlap when shifted (0x00000100, 0x00010000, ...)
SHIFTY = [1, 256, 65536, 1 << 24, 257, (1 << 28) - 1]


@pytest.mark.parametrize("alphabet", [2, 3, 7, SHIFTY])
def test_suffix_matches_bruteforce_through_extend_and_truncate(alphabet):
    """The match, the proposal and a tree's second branch (`propose_alternative`) against scans."""
    values = alphabet if isinstance(alphabet, list) else list(range(alphabet))
    rng = random.Random(len(values))
    d = SuffixDrafter()
    ref: list[int] = []
    second_branches = 0
    for _ in range(400):
        if ref and rng.random() < 0.3:
            n = rng.randrange(0, len(ref) + 1)
            d.truncate(n)
            del ref[n:]
        else:
            new = [rng.choice(values) for _ in range(rng.randrange(1, 6))]
            d.extend(new)
            ref.extend(new)
        length, end, branches = reference_match(ref)
        assert d.match() == (length, end, branches), ref
        k = rng.randrange(1, 6)
        drafts, q = d.propose(k)
        assert q is None
        assert drafts == (ref[end + 1 : min(end + 1 + k, len(ref))] if length else [])
        assert (d.last_match, d.last_branches) == ((length, branches) if length else (0, 0))
        alt = d.propose_alternative(k)
        assert alt == (reference_alternative(ref, length, k) if drafts and branches > 1 else []), ref
        assert not alt or alt[0] != drafts[0]
        second_branches += bool(alt)
    assert second_branches > 20  # the branch case was really exercised


def test_rollback_gives_the_automaton_built_from_scratch():
    rng = random.Random(5)
    tokens = [rng.randrange(4) for _ in range(300)]
    d = SuffixDrafter()
    d.extend(tokens)
    for cut in (299, 250, 120, 7, 0):
        d.truncate(cut)
        fresh = SuffixDrafter()
        fresh.extend(tokens[:cut])
        assert automaton(d) == automaton(fresh)
        d.extend(tokens[cut:])  # and back: the same as the first build
        full = SuffixDrafter()
        full.extend(tokens)
        assert automaton(d) == automaton(full)


def test_a_long_quote_is_matched_in_full_and_continued():
    doc = list(range(100, 160))
    d = SuffixDrafter()
    d.extend([*doc, 1, 2, *doc[10:40]])  # the answer quotes 30 tokens of the document
    drafts, _ = d.propose(5)
    assert d.last_match == 30 and drafts == doc[40:45] and d.last_branches == 1


def test_no_draft_without_a_match_of_min_match_tokens():
    d = SuffixDrafter(min_match=3)
    d.extend([1, 2, 3, 9, 2, 3])  # "2 3" occurred before, but only 2 tokens long
    assert d.propose(4) == ([], None) and d.last_match == 0
    d.extend([4])
    assert d.propose(4) == ([], None)  # nothing ever followed "... 3 4"
    d2 = SuffixDrafter()
    d2.extend([1, 2, 3, 9, 2, 3])
    assert d2.propose(4)[0] == [9, 2, 3] and d2.last_match == 2


def test_branches_count_the_tokens_that_followed_the_match():
    d = SuffixDrafter()
    d.extend([7, 1, 7, 2, 7, 3, 7])
    assert d.match() == (1, 4, 3)
    assert d.propose(2)[0] == [3, 7]  # the latest occurrence's continuation


def test_the_latest_occurrence_is_found_past_byte_matches_that_straddle_tokens():
    # as plain int32 bytes, "1 1" (01 00 00 00 01 00 00 00) would appear shifted inside "256 256 ..."
    # (00 01 00 00 ...); the drafter's byte form lets only whole tokens match
    d = SuffixDrafter()
    d.extend([1, 1, 5, 256, 256, 256, 9, 1, 1])
    assert d.match() == (2, 1, 1) and d.propose(3)[0] == [5, 256, 256]


def test_long_matches_follow_their_last_reach_tokens():
    block = list(range(50))
    d = SuffixDrafter()
    d.extend([*block, 77, *block[-SuffixDrafter.REACH :], 88, *block])
    length, end, _ = d.match()
    assert length == 50 and end == 49 + 1 + SuffixDrafter.REACH  # the later, shorter copy ends there


def test_rejects_ids_outside_vocab_and_bad_truncates():
    d = SuffixDrafter(vocab_size=10)
    with pytest.raises(ValueError, match="outside"):
        d.extend([10])
    with pytest.raises(ValueError, match="outside"):
        d.extend([-1])
    with pytest.raises(ValueError, match="outside"):
        SuffixDrafter().extend([1 << 28])
    d.extend([1, 2])
    with pytest.raises(ValueError, match="cannot truncate"):
        d.truncate(3)
