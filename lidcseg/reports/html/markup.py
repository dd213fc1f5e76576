"""HTML building blocks of the report: escaped text, tables, inline figures, sections.

Every function returns a string of HTML; text passed in is escaped (:func:`esc`),
except :class:`Raw` values, which are markup already. Figures are inline
``data:`` URIs: the report is one file with nothing to fetch.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class Raw(str):
    """Markup that is inserted as it is (already escaped)."""


def esc(value: Any) -> str:
    """``value`` as HTML text (``Raw`` passes through)."""
    if isinstance(value, Raw):
        return str(value)
    return html.escape("" if value is None else str(value), quote=True)


def tag(name: str, body: Any = "", **attrs: Any) -> Raw:
    """``<name attrs>body</name>``; attribute names take ``_`` for ``-`` and a trailing ``_``
    is dropped (``class_``); None/False attributes are left out, True ones written bare."""
    parts = [name]
    for key, value in attrs.items():
        key = key.rstrip("_").replace("_", "-")
        if value is None or value is False:
            continue
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    return Raw(f"<{' '.join(parts)}>{esc(body)}</{name}>")


def join(items: Iterable[Any], sep: str = "") -> Raw:
    """Escaped items joined into one piece of markup."""
    return Raw(sep.join(esc(i) for i in items))


def para(text: Any, **attrs: Any) -> Raw:
    return tag("p", text, **attrs)


#: A cell that reads as a number (right-aligned): ``0.310``, ``-1``, ``0.87 ± 0.2``, ``–``, ``1:05``,
#: ``12.5%``, a time ``2026-01-31 12:00:00``.
_NUMBER = re.compile(r"^([-−+]?\d[\d.,:e+-]*%?( ± [\d.]+%?)?( [\[(].*[\])])?|–|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$")


def is_number(value: Any) -> bool:
    """Whether a table cell holds a number (or the dash of a missing one)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and not isinstance(value, Raw) and bool(_NUMBER.match(value.strip()))


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], *, caption: Any = None,
          numeric_from: int = 1, class_: str | None = None) -> Raw:
    """A table with a header row; from column ``numeric_from`` on, numbers are right-aligned."""
    head = join(tag("th", h, scope="col") for h in headers)
    body = []
    for row in rows:
        cells = [tag("th" if j == 0 else "td", v, scope="row" if j == 0 else None,
                     class_="num" if j >= numeric_from and is_number(v) else None) for j, v in enumerate(row)]
        body.append(tag("tr", join(cells)))
    cap = tag("caption", caption) if caption is not None else ""
    return tag("div", tag("table", Raw(cap + tag("thead", tag("tr", head)) + tag("tbody", join(body))),
                          class_=class_), class_="table-wrap")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(png: bytes, alt: str, **attrs: Any) -> Raw:
    """An inline PNG with its alt text."""
    parts = [f'src="{data_uri(png)}"', f'alt="{esc(alt)}"']
    parts += [f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None]
    return Raw(f"<img {' '.join(parts)}>")


def figure(png: bytes | Path | None, alt: str, caption: Any, *, missing: str | None = "") -> Raw:
    """``<figure>`` with an inline PNG (bytes or a file) and its caption.

    An absent figure gives the note ``missing`` (a default text for ``""``), or nothing for None.
    """
    if isinstance(png, Path):
        png = png.read_bytes() if png.is_file() else None
    if png is None:
        return Raw("") if missing is None else para(missing or "The figure was not produced.", class_="missing")
    return tag("figure", Raw(img(png, alt) + tag("figcaption", caption)))


def details(summary: Any, body: Any, open_: bool = False) -> Raw:
    return tag("details", Raw(tag("summary", summary) + esc(body)), open=open_)


def pre_json(obj: Any) -> Raw:
    return tag("pre", json.dumps(obj, indent=2, sort_keys=True, default=str), class_="json")


def section(id_: str, title: Any, *body: Any) -> Raw:
    """A top-level section with its heading (``aria-labelledby`` names it)."""
    head = tag("h2", title, id=f"{id_}-title")
    return tag("section", Raw(head + join(body)), id=id_, aria_labelledby=f"{id_}-title")


def missing(text: str) -> Raw:
    """A note that a part of the reproduction was not run or not found."""
    return para(text, class_="missing")


def json_script(id_: str, obj: Any) -> Raw:
    """Data for the page's script: ``<script type="application/json">``, safe against ``</script>``."""
    text = json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    return Raw(f'<script type="application/json" id="{esc(id_)}">{text}</script>')


def page(title: str, nav: Sequence[tuple[str, str]], body: Any, *, css: str, script: str = "") -> str:
    """The whole document: head with inline CSS, a skip link, the contents list, ``body``."""
    links = join(tag("li", tag("a", text, href=f"#{anchor}")) for anchor, text in nav)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{css}</style></head><body>"
        f'<a class="skip" href="#main">Skip to the report</a>'
        f'<header><h1>{esc(title)}</h1><nav aria-label="Contents"><ul>{links}</ul></nav></header>'
        f'<main id="main">{esc(body)}</main>'
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )
