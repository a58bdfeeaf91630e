"""What every report shares: the Jinja2 environment, the page's CSS, and data URIs.

A report is one HTML file that opens offline: images and plots are inlined as ``data:`` URIs,
the CSS is in the page, and nothing is fetched (no scripts, fonts or stylesheets from a network).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import jinja2

__all__ = ["PAGE_CSS", "data_uri", "figure_data_uri", "render"]

PAGE_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; } h3 { font-size: 14px; margin: 16px 0 6px; }
.muted { color: #666; } .note { background: #fff7e0; border: 1px solid #f0d48a; padding: 6px 10px; display: inline-block; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f6f6f6; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; word-break: break-all; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)); gap: 10px; }
.cell { border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 11px; text-align: center; }
.cell img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #f3f3f3; }
.cell .missing { width: 96px; height: 96px; margin: auto; background: #fbe9e9; color: #a33; font-size: 10px;
                 display: flex; align-items: center; justify-content: center; overflow: hidden; }
.key { color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar { display: inline-block; height: 10px; background: #4c78a8; vertical-align: middle; }
.bar.pool { background: #bbb; }
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    """Render a template string (autoescaped: keys and error reasons are untrusted text)."""
    return _ENV.from_string(template).render(css=PAGE_CSS, **context)


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for inlining bytes in the page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_data_uri(figure: Any) -> str:
    """A matplotlib figure as an inlined PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return data_uri(buffer.getvalue(), "image/png")
