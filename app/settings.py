"""One typed settings object: built-in defaults <- config file (TOML) <- command-line flags.

UI-free: the headless `ask` command and the TUI both read it. The config file lives at
`user_config_dir("triforce-chat")/config.toml` (env TRIFORCE_CHAT_CONFIG overrides the path) and
holds a default for every option plus a `[keymap]` table mapping binding ids to keys, e.g.

    model = "smollm2-135m-instruct"
    level = 2
    budget = "4096"        # tokens, or a fraction of the context such as "0.1" or "10%"
    theme = "triforce-light"
    repetition-penalty = 1.1
    stop-on-repetition = false
    tree = false           # no tree windows (two ways of a branching match verified at once)
    restrict-draft-heads = false  # drafters' logits over the whole vocabulary (decoding/draft_head.py)

    [keymap]
    cycle-level = "ctrl+t"
    stop = "escape,ctrl+x"

    [cache]
    max_gb = 8             # the document cache's size cap (least recently used documents go first)
    enabled = true         # false: never save or restore prefilled documents (--no-doc-cache)

The sampling settings a model recommends (its generation config: temperature, top_p, top_k,
repetition_penalty) sit between the built-in defaults and the file: a flag > the config file > the
model's defaults > the built-in defaults. The model is known only once it is loaded, so `Settings`
remembers which options the file or the flags gave (`given`), and `with_model_defaults` fills the
others in afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from triforce_chat.decoding.config import MODEL_DEFAULT_KEYS, DecodeConfig
from triforce_chat.decoding.store.docstore import DEFAULT_MAX_GB

APP_NAME = "triforce-chat"
# weights: "auto" keeps them as shipped (GGUF blocks, or a checkpoint's own float dtype)
WEIGHTS = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("auto", "float16", "bfloat16", "float32")
MAX_CONTEXT = 1 << 24  # 16M tokens: beyond any model's positions, and a bound for a mistyped number
MAX_THREADS = 1024


class SettingsError(ValueError):
    """A bad config file or option; the message is one line for the user (it names the line)."""


def config_path() -> Path:
    env = os.environ.get("TRIFORCE_CHAT_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP_NAME)) / "config.toml"


def data_dir() -> Path:
    env = os.environ.get("TRIFORCE_CHAT_DATA")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME))


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    # the decoding options: same names as DecodeConfig, whose defaults are the only ones
    draft: str = DecodeConfig.draft
    level: int = DecodeConfig.level
    budget: str = DecodeConfig.budget
    chunk_size: int = DecodeConfig.chunk_size
    gamma_mid: int = DecodeConfig.gamma_mid
    gamma_low: int = DecodeConfig.gamma_low
    temperature: float = DecodeConfig.temperature
    top_p: float = DecodeConfig.top_p
    top_k: int = DecodeConfig.top_k
    repetition_penalty: float = DecodeConfig.repetition_penalty
    repetition_window: int = DecodeConfig.repetition_window
    seed: int | None = DecodeConfig.seed
    max_new_tokens: int = DecodeConfig.max_new_tokens
    truncate: bool = DecodeConfig.truncate
    adaptive: bool = DecodeConfig.adaptive
    tree: bool = DecodeConfig.tree
    restrict_draft_heads: bool = DecodeConfig.restrict_draft_heads
    stop_on_repetition: bool = DecodeConfig.stop_on_repetition
    loop_repeats: int = DecodeConfig.loop_repeats
    loop_min_tokens: int = DecodeConfig.loop_min_tokens
    loop_max_span: int = DecodeConfig.loop_max_span
    # loading and the app
    weights: str = "auto"
    kv_dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    context: int | None = None
    theme: str = "triforce-dark"
    history: bool = True  # save conversations in the data dir
    doc_cache: bool = True  # save prefilled documents and restore them next time ([cache] enabled)
    cache_max_gb: float = DEFAULT_MAX_GB  # [cache] max_gb
    keymap: dict[str, str] = field(default_factory=dict)
    # the options the config file or the flags gave (so a model's defaults do not override them)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # where each value from the config file was set ("setting" or "keymap.<id>" -> "<file>, line N"),
    # so that problems found later (a keymap clash, in the app) can name the line
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # -- construction -------------------------------------------------------------------------------
    def merged(self, **overrides: Any) -> Settings:
        """A copy with the given options replaced; None means "not given" and keeps the current value.
        `keymap` is merged key by key. Raises SettingsError for unknown names and bad values."""
        known = {f.name for f in fields(self)} - {"given", "origin"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SettingsError(f"unknown option: {', '.join(unknown)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "keymap" in changes:
            changes["keymap"] = {**self.keymap, **changes["keymap"]}
        if "budget" in changes:
            changes["budget"] = str(changes["budget"])
        new = dataclasses.replace(self, **changes, given=self.given | set(changes))
        new.validate()
        return new

    def with_model_defaults(self, defaults: dict[str, Any]) -> Settings:
        """A copy taking the loaded model's recommended sampling settings (temperature, top_p,
        top_k, repetition_penalty) for every one of them that neither the config file nor a flag
        gave. A value these settings would refuse is skipped, so a model's odd metadata never
        stops the app."""
        new = self
        for key in MODEL_DEFAULT_KEYS:
            if key not in defaults or key in self.given:
                continue
            value = defaults[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            candidate = dataclasses.replace(new, **{key: int(value) if key == "top_k" else float(value)})
            try:
                candidate.validate()
            except SettingsError:
                continue
            new = candidate
        return new

    def validate(self) -> None:
        """Raise SettingsError with a one-line message for the first invalid value."""
        try:  # the decoding options are validated where they are used, once
            self.decode_config().validate()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        checks = [
            (self.weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, not {self.weights!r}"),
            (self.kv_dtype in KV_DTYPES, f"kv-dtype must be one of {', '.join(KV_DTYPES)}, not {self.kv_dtype!r}"),
            (bool(self.device), "device must not be empty"),
            (self.threads is None or 1 <= self.threads <= MAX_THREADS,
             f"threads must be between 1 and {MAX_THREADS}, not {self.threads}"),
            (self.context is None or 16 <= self.context <= MAX_CONTEXT,
             f"context must be between 16 and {MAX_CONTEXT:,} tokens, not {self.context}"),
            (bool(self.theme), "theme must not be empty"),
            (self.cache_max_gb > 0, f"cache.max_gb must be a positive number of GB, not {self.cache_max_gb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    # -- what the decoder and the loader need -----------------------------------------------------
    def decode_config(self) -> DecodeConfig:
        """The DecodeConfig for these settings: every option the two share, by name."""
        shared = {f.name for f in fields(DecodeConfig)} & {f.name for f in fields(self)}
        return DecodeConfig(**{name: getattr(self, name) for name in shared})

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self):
        """The dtype the weights are converted to at load; None keeps them as shipped."""
        import torch

        return None if self.weights == "auto" else getattr(torch, self.weights)

    def torch_kv_dtype(self):
        """The KV cache's storage dtype; None lets the loader choose (16-bit with the native kernels)."""
        import torch

        return None if self.kv_dtype == "auto" else getattr(torch, self.kv_dtype)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("given")
        out.pop("origin")
        return out


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "draft": (str,),
    "level": (int,),
    "budget": (str, int, float),
    "chunk_size": (int,),
    "gamma_mid": (int,),
    "gamma_low": (int,),
    "temperature": (float, int),
    "top_p": (float, int),
    "top_k": (int,),
    "repetition_penalty": (float, int),
    "repetition_window": (int,),
    "seed": (int,),
    "max_new_tokens": (int,),
    "weights": (str,),
    "kv_dtype": (str,),
    "device": (str,),
    "threads": (int,),
    "context": (int,),
    "truncate": (bool,),
    "adaptive": (bool,),
    "tree": (bool,),
    "restrict_draft_heads": (bool,),
    "stop_on_repetition": (bool,),
    "loop_repeats": (int,),
    "loop_min_tokens": (int,),
    "loop_max_span": (int,),
    "theme": (str,),
    "history": (bool,),
}


def _line_of(text: str, key: str, section: str | None = None) -> int | None:
    """The 1-based line where `key` (or its dashed/underscored spelling) is assigned in the table
    `section` (None: the top level, before any [table]), if it can be found."""
    names = {key, key.replace("_", "-"), key.replace("-", "_")}
    assign = re.compile(r'^\s*(?:"([^"]+)"|\'([^\']+)\'|([A-Za-z0-9_\-]+))\s*=')
    header = re.compile(r'^\s*\[\s*(?:"([^"]+)"|([A-Za-z0-9_\-.]+))\s*\]')
    current: str | None = None
    for i, line in enumerate(text.splitlines(), 1):
        h = header.match(line)
        if h:
            current = h.group(1) or h.group(2)
            continue
        m = assign.match(line)
        if m and current == section and (m.group(1) or m.group(2) or m.group(3)) in names:
            return i
    return None


_CACHE_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "max_gb": ("cache_max_gb", (float, int)),
    "enabled": ("doc_cache", (bool,)),
}


def _cache_table(table: Any, where: Callable[[str], str]) -> dict[str, Any]:
    """The [cache] table: max_gb (the document cache's cap) and enabled."""
    if not isinstance(table, dict):
        raise SettingsError(f"{where('cache')}: cache must be a table ([cache] with max_gb = 8)")
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in _CACHE_KEYS:
            raise SettingsError(f"{where(raw_key)}: unknown setting cache.{raw_key} (known: max_gb, enabled)")
        name, types = _CACHE_KEYS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise SettingsError(f"{where(raw_key)}: cache.{raw_key} must be {expected}, not {value!r}")
        if name == "cache_max_gb":
            if value <= 0:
                raise SettingsError(f"{where(raw_key)}: cache.max_gb must be a positive number of GB, not {value}")
            value = float(value)
        out[name] = value
    return out


MAX_CONFIG_BYTES = 1 << 20


def load_settings(
    path: Path | None = None, base: Settings | None = None, warn: Callable[[str], None] | None = None
) -> Settings:
    """Read the config file (default: config_path()); a missing file gives the defaults.

    Every message names the file, the line and the key. Without `warn`, the first problem raises
    SettingsError. With `warn`, every problem is passed to it and what is wrong keeps `base`'s
    value (the defaults): a mistyped key, a wrong type or a huge number never keeps the app from
    starting, and the rest of the file still applies. The file itself is never changed."""
    path = Path(path) if path is not None else config_path()
    base = base or Settings()
    if not path.exists():
        return base
    lenient = warn is not None

    def report(message: str, fallback: str) -> None:
        if not lenient:
            raise SettingsError(message)
        warn(f"{message} ({fallback})")

    try:
        with path.open("rb") as f:  # at most a little more than a config file can need: /dev/zero never ends
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES >> 20} MiB, not a config file")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        report(f"{path}: cannot read the config file ({exc})", "using the defaults")
        return base
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message says "(at line N, column M)"
        report(f"{path}: {exc}", "the whole file is ignored until this is fixed; using the defaults")
        return base

    def where(key: str, section: str | None = None) -> str:
        line = _line_of(text, key, section)
        return f"{path}, line {line}" if line else str(path)

    def default_of(key: str) -> str:
        return f"using the default, {getattr(base, key)!r}"

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "dtype":  # the name of `weights` before GGUF weights were computed as shipped
            key = "weights"
        if key == "keymap":
            if not isinstance(value, dict):
                report(f'{where(raw_key)}: keymap must be a table ([keymap] with id = "keys")', "keymap ignored")
                continue
            keymap: dict[str, str] = {}
            for bid, keys in value.items():
                if not isinstance(keys, str) or not keys.strip():
                    report(
                        f'{where(bid, raw_key)}: keymap.{bid} must be a string of keys such as "ctrl+t", not {keys!r}',
                        "that binding keeps its default key",
                    )
                    continue
                keymap[bid] = keys.strip()
                origin[f"keymap.{bid}"] = where(bid, raw_key)
            values["keymap"] = keymap
            continue
        if key == "cache":
            try:
                values.update(_cache_table(value, lambda k: where(k, "cache") if k != "cache" else where(k)))
            except SettingsError as exc:
                report(str(exc), "the [cache] table keeps its defaults")
            continue
        if key not in _FIELD_TYPES:
            report(f"{where(raw_key)}: unknown setting {raw_key!r}", "ignored")
            continue
        types = _FIELD_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types)
            report(f"{where(raw_key)}: {raw_key} must be {expected}, not {value!r}", default_of(key))
            continue
        if float in types and int in types and key != "budget":
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                report(f"{where(raw_key)}: {raw_key} is out of range: {value}", default_of(key))
                continue
        if lenient:  # each value on its own first, so that one bad value names its own line
            try:
                base.merged(**{key: value})
            except SettingsError as exc:
                report(f"{where(raw_key)}: {exc}", default_of(key))
                continue
        values[key] = value
        origin[key] = where(raw_key)
    while True:  # then together: some values are only wrong in combination (budget and chunk size)
        try:
            merged = base.merged(**values)
            break
        except SettingsError as exc:
            bad = next((k for k in values if k != "keymap" and (k.replace("_", "-") in str(exc) or k in str(exc))),
                       None)
            if bad is None:
                bad = next((k for k in reversed(values) if k != "keymap"), None)
            if bad is None:
                raise
            report(f"{where(bad)}: {exc}", default_of(bad))
            del values[bad]
    return dataclasses.replace(merged, origin=origin)
