"""The `[keymap]` table checked against the app's bindings before Textual sees it.

Why: Textual takes any string as a key and silently never matches one it does not know, and when
two bindings share a key one of them silently stops working. So every entry is checked here: an
unknown binding id, a key name Textual does not know, or a key that another action of the same
screen already uses gets one message naming the config file, the line and the binding, and that
binding keeps its default key. Everything else in the keymap still applies.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Sequence

from textual.binding import Binding
from textual.keys import KEY_ALIASES, REPLACED_KEYS, Keys, _character_to_key, key_to_character

from triforce_chat.app.safe_text import one_line

MODIFIERS = frozenset({"ctrl", "alt", "shift", "meta", "super", "hyper"})
NAMED_KEYS = frozenset(
    k.value.rpartition("+")[2] for k in Keys if not k.value.startswith("<")
) | frozenset({"newline", "space", "tab", "enter", "escape", "backspace"})


def key_problem(key: str) -> str | None:
    """Why `key` (one key, such as "ctrl+t") is not a key Textual can match; None if it is."""
    if not key:
        return "an empty key"
    if key != key.strip() or " " in key:
        return f"{key!r} has spaces (write keys like ctrl+t, several separated by commas)"
    *mods, base = key.split("+") if key != "+" else ["+"]
    for mod in mods:
        if mod not in MODIFIERS:
            return f"{key!r}: {mod!r} is not a modifier (ctrl, alt, shift, meta, super, hyper)"
    if not base:
        return f"{key!r} has no key after the modifiers"
    if base in NAMED_KEYS or base in REPLACED_KEYS:
        return None
    if len(base) == 1:
        return None if base.isprintable() else f"{key!r} is a control character, not a key name"
    if key_to_character(base) is not None or _unicode_name(base):
        return None
    return f"{key!r} is not a key name (examples: ctrl+t, f5, escape, alt+up)"


def _unicode_name(name: str) -> bool:
    try:
        unicodedata.lookup(name.replace("_", " ").upper())
    except KeyError:
        return False
    return True


def split_keys(keys: str) -> list[str]:
    return [k.strip() for k in keys.split(",")]


def normal_forms(key: str) -> set[str]:
    """The names Textual may report for `key` (a character by its name, plus its aliases)."""
    *mods, base = key.split("+") if key != "+" else ["+"]
    if len(base) == 1:
        base = _character_to_key(base)
    name = "+".join([*mods, base])
    forms = {name, *KEY_ALIASES.get(name, [])}
    forms |= {k for k, aliases in KEY_ALIASES.items() if name in aliases}
    return forms


def check_keymap(
    keymap: dict[str, str],
    scopes: Sequence[Iterable[Binding]],
    where: Callable[[str], str],
) -> tuple[dict[str, str], list[str]]:
    """(the entries that are safe to apply, one message per entry that is not).

    `scopes`: groups of bindings active at the same time (a key may mean different things on
    different screens, never two things on one). `where(binding_id)` names the file and line."""
    scopes = [[b for b in scope if isinstance(b, Binding)] for scope in scopes]
    defaults = {b.id: b.key for scope in scopes for b in scope if b.id}
    problems: list[str] = []
    clean: dict[str, str] = {}
    for bid, keys in keymap.items():
        shown = one_line(bid, 60)
        if bid not in defaults:
            problems.append(f"{where(bid)}: keymap: unknown binding id {shown} (f1 lists the ids); ignored")
            continue
        bad = next((p for p in map(key_problem, split_keys(keys)) if p), None)
        if bad:
            problems.append(f"{where(bid)}: keymap.{shown}: {one_line(bad, 120)}; it keeps {defaults[bid]}")
            continue
        clean[bid] = ",".join(split_keys(keys))

    for _ in range(len(clean) + 1):  # dropping a remap can only remove clashes; a few rounds settle it
        clash = _first_clash(scopes, clean)
        if clash is None:
            break
        key, bid, other = clash  # bid is remapped
        problems.append(f"{where(bid)}: keymap.{bid}: {key} is already the key of {other}; {bid} keeps {defaults[bid]}")
        del clean[bid]
    return clean, problems


def _first_clash(scopes: Sequence[list[Binding]], keymap: dict[str, str]) -> tuple[str, str, str] | None:
    """(key, binding id, other binding id) of the first key two bindings of one scope share, one of
    them remapped (the app's own defaults are free of clashes; a test checks that)."""
    for scope in scopes:
        owner: dict[str, str] = {}
        for binding in scope:
            if not binding.id:
                continue
            for key in split_keys(keymap.get(binding.id, binding.key)):
                for form in normal_forms(key):
                    other = owner.setdefault(form, binding.id)
                    if other != binding.id and (other in keymap or binding.id in keymap):
                        # report the remapped binding first, so that it is the one that yields
                        first, second = (binding.id, other) if binding.id in keymap else (other, binding.id)
                        return key, first, second
    return None
