"""Jinja2 templates and static assets of the HTML reports (package data).

`render_page(template, **context)` is how every report (diagnosis, lab,
compare, capacity) becomes one self-contained HTML file: templates extend
`base.html.j2`, which inlines the stylesheet and plotly.js exactly once and
renders every chart placed with the `chart()` macro of `macros.j2`.

Untrusted text (prompts, server messages, labels) is escaped by autoescape;
chart JSON goes through the `chart_json` filter, which escapes `<`, `>` and
`&` so no string in the data can close the `<script>` element it sits in.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from servescope.rundir.jsonio import dumps, to_jsonable
from servescope.units import format_duration

TEMPLATE_DIR = Path(__file__).parent


def safe_json(value: Any) -> str:
    """JSON that is safe inside `<script>`: `<`, `>`, `&` become \\u escapes."""
    text = dumps(value, indent=None)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def chart_json(value: Any) -> Markup:
    return Markup(safe_json(value))


def fmt_num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{float(value):,.{digits}f}"


def fmt_pct(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * float(value):.{digits}f}%"


def fmt_json(value: Any, limit: int = 400) -> str:
    text = json.dumps(to_jsonable(value), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,  # .j2 files are HTML: everything is escaped unless marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(chart_json=chart_json, ms=format_duration, num=fmt_num, pct=fmt_pct, tojson_text=fmt_json)
    return env


@lru_cache(maxsize=1)
def plotly_js() -> Markup:
    """plotly.js source (about 4.8 MB), inlined once per report so it opens offline."""
    from plotly.offline import get_plotlyjs

    return Markup(get_plotlyjs().replace("</script", "<\\/script"))


def render_page(template: str, **context: Any) -> str:
    """Render a report template (one that extends base.html.j2) to a complete HTML string."""
    from servescope.version import __version__

    context.setdefault("version", __version__)
    context.setdefault("generated_at", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    context.setdefault("css", Markup((TEMPLATE_DIR / "report.css").read_text()))
    context.setdefault("plotly_js", plotly_js())
    return environment().get_template(template).render(**context)
