"""The one markdown writer of the reports: headings, paragraphs and tables, in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lidcseg.reports.tables import markdown_table


class Markdown:
    """A markdown document built top to bottom.

    >>> doc = Markdown("Evaluation")
    >>> doc.paragraph("GED per image.").table(["run", "GED"], [["a", "0.25"]]).text()
    '# Evaluation\\n\\nGED per image.\\n\\n| run | GED |\\n|---|---|\\n| a | 0.25 |\\n'
    """

    def __init__(self, title: str) -> None:
        self.blocks: list[str] = [f"# {title}"]

    def heading(self, text: str, level: int = 2) -> Markdown:
        self.blocks.append(f"{'#' * level} {text}")
        return self

    def paragraph(self, text: str) -> Markdown:
        self.blocks.append(text)
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Markdown:
        self.blocks.append(markdown_table(headers, rows))
        return self

    def text(self) -> str:
        """The document: blocks separated by a blank line, ending in a newline."""
        return "\n\n".join(self.blocks) + "\n"
