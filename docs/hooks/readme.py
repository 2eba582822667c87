"""MkDocs hook: the site's home page is the repository's README (one home for the front page).

``docs/index.md`` holds only the ``<!-- readme -->`` marker; the README's links point into ``docs/`` so
that they work on the repository's web page, and are rewritten here relative to the site's root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- readme -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
    return markdown.replace(MARKER, readme)
