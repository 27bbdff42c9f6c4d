"""The small HTML tables that results show in Jupyter (their ``_repr_html_``): a caption, a header
row, at most :data:`MAX_ROWS` rows and a "… N more" line; every value escaped, numbers rounded.

Example:
    >>> print(html_table(["spec", "top token"], [["fe_lt", "<b>"]], caption="2 < 3"))
    <table><caption>2 &lt; 3</caption><thead><tr><th>spec</th><th>top token</th></tr></thead><tbody>
    <tr><td>fe_lt</td><td>&lt;b&gt;</td></tr></tbody></table>
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

MAX_ROWS = 20
"""Rows shown; the rest are counted in a last line."""


def cell(value: Any, digits: int = 4) -> str:
    """One value as escaped text: floats to ``digits`` significant digits, None as empty.

    Example:
        >>> cell(0.123456), cell(None), cell("a & b"), cell(float("nan"))
        ('0.1235', '', 'a &amp; b', 'nan')
    """
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return html.escape(str(value))


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str | None = None,
               max_rows: int = MAX_ROWS) -> str:
    """An HTML table (``caption``, ``headers``, ``rows`` as values), escaped; beyond ``max_rows``
    rows a last row says how many more there are."""
    head = "".join(f"<th>{cell(h)}</th>" for h in headers)
    body = ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows[:max_rows]]
    if len(rows) > max_rows:
        body.append(f'<tr><td colspan="{len(headers)}">… {len(rows) - max_rows} more</td></tr>')
    top = f"<caption>{cell(caption)}</caption>" if caption else ""
    return f"<table>{top}<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "</tbody></table>"


def short(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters with "…" (escape it after, with :func:`cell`)."""
    return text if len(text) <= width else text[:width - 1] + "…"
