"""Themes and stylesheets for the TUI.

The layout lives in `triforce.tcss` (package data); colours live in Textual themes. Every theme
defines the token-origin colours as theme variables, used both by the stylesheet and by the
answer visualisation (`$origin-low`, `$origin-mid`, `$origin-target`, `$origin-reject`), so the
visualisation follows the theme, including themes picked from the command palette (they fall back
to ORIGIN_DEFAULTS).
"""

from __future__ import annotations

from pathlib import Path

from textual.theme import Theme

ORIGIN_DEFAULTS = {
    "origin-low": "#4caf50",
    "origin-mid": "#29b6f6",
    "origin-target": "#ff9800",
    "origin-reject": "#ef5350",
}

TRIFORCE_DARK = Theme(
    name="triforce-dark",
    primary="#7aa2f7",
    secondary="#bb9af7",
    accent="#e0af68",
    warning="#e0af68",
    error="#f7768e",
    success="#9ece6a",
    foreground="#d5dae5",
    background="#1a1b26",
    surface="#20222e",
    panel="#292c3c",
    dark=True,
    variables={
        "origin-low": "#9ece6a",  # green: accepted from the bottom drafter
        "origin-mid": "#7dcfff",  # cyan: accepted from the retrieval-cache level
        "origin-target": "#ff9e64",  # orange: produced / corrected by the full target
        "origin-reject": "#f7768e",
        "block-cursor-text-style": "none",
        "footer-key-foreground": "#7aa2f7",
    },
)

TRIFORCE_LIGHT = Theme(
    name="triforce-light",
    primary="#0550ae",
    secondary="#8250df",
    accent="#9a4d00",
    warning="#9a6700",
    error="#cf222e",
    success="#1a7f37",
    foreground="#1f2328",
    background="#f6f8fa",
    surface="#ffffff",
    panel="#e6eaef",
    dark=False,
    variables={
        "origin-low": "#1a7f37",  # green
        "origin-mid": "#0550ae",  # blue
        "origin-target": "#b35900",  # dark orange
        "origin-reject": "#cf222e",
        "block-cursor-text-style": "none",
        "footer-key-foreground": "#0550ae",
    },
)

THEMES = (TRIFORCE_DARK, TRIFORCE_LIGHT)


STYLESHEET = Path(__file__).with_name("triforce.tcss")
"""The layout stylesheet, package data beside this module (in a checkout and in a wheel alike)."""
