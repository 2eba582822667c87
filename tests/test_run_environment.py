"""What a run records about the code that made it: the revision is read once per process, so a commit
made while a long sweep or tuning worker runs does not relabel the runs it makes afterwards."""

from __future__ import annotations

import itertools

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
