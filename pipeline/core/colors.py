"""Class colours: the default palette and ``#rrggbb`` -> RGB."""

from __future__ import annotations

# matplotlib's tab10: distinct, and familiar from every plot a user has seen
DEFAULT_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def default_color(index: int) -> str:
    """The palette's colour for class ``index`` (it repeats after ten)."""
    return DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


def rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` as ``(r, g, b)``, 0-255."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
