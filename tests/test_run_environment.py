"""What a run records about the code that made it: the revision is read once per process, so a commit
made while a long sweep or tuning worker runs does not relabel the runs it makes afterwards."""

from __future__ import annotations

import itertools
import subprocess

from fimlora import runs


def test_the_source_revision_is_read_once_per_process(monkeypatch):
    revisions = (f"{n:040x}" for n in itertools.count(1))  # every read sees a new HEAD
    monkeypatch.setattr(runs, "git_revision", lambda path: next(revisions))
    runs.source_revision.cache_clear()
    try:
        first, second = runs.environment(0), runs.environment(1)
        assert first["git_revision"] == second["git_revision"] == f"{1:040x}"
    finally:
        runs.source_revision.cache_clear()


def test_dirty_means_the_code_below_the_path_changed(tmp_path):
    """A study's tuning database changes while its runs train; that is not uncommitted code."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "data" / "tuning.db").write_text("a")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    clean = runs.git_revision(tmp_path / "src")
    assert clean is not None and len(clean) == 40
    (tmp_path / "data" / "tuning.db").write_text("b")
    assert runs.git_revision(tmp_path / "src") == clean
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert runs.git_revision(tmp_path / "src") == f"{clean}-dirty"
