"""Plots for Dagster's asset metadata: an SVG as a Markdown image, so the UI renders it inline."""

from __future__ import annotations

import base64


def svg_markdown(svg: str, alt: str = "plot") -> str:
    return f"![{alt}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
