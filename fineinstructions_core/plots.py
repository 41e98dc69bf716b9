"""Plots for Dagster's asset metadata: an SVG as a Markdown image, so the UI renders it inline."""

from __future__ import annotations

import base64


def svg_markdown(svg: str, alt: str = "plot") -> str:
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"


def bars_svg(items: list[tuple[str, float]], width: int = 480, bar: int = 16) -> str:
    """Horizontal bars, one per (label, value), scaled to the largest; values printed beside them."""
    height = 8 + bar * len(items)
    top = max((v for _, v in items), default=0) or 1
    label_w = 170
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="10">'
    ]
    for i, (label, value) in enumerate(items):
        y = 4 + i * bar
        w = (width - label_w - 60) * value / top
        text = label if len(label) <= 30 else label[:29] + "…"
        parts.append(f'<text x="{label_w - 4}" y="{y + bar - 5}" text-anchor="end">{_escape(text)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{bar - 4}" fill="#4c78a8"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 5}">{value:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
