"""MkDocs hook: the worked notebook lives in ``examples/`` (where users look for it, and where ``make test``
executes it); this adds it to the site as ``examples/<name>.ipynb`` for mkdocs-jupyter to render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


# Before mkdocs-jupyter's own on_files, which turns the .ipynb files it sees into pages.
@event_priority(100)
def on_files(files: Files, config: Any, **_: Any) -> Files:
    for notebook in sorted((ROOT / "examples").glob("*.ipynb")):
        files.append(
            File(
                f"examples/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
