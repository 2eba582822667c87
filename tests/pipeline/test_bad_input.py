"""Bad input and faults → one line on stderr and exit code 2, never a traceback (table-driven).

Every case here printed a traceback, passed silently or misled before: each row names what the user
did and words the one line must contain.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from results.fabricate import write_run

from fimlora.cli import app, main
from fimlora.fisher.result import META_FILE, TENSORS_FILE

OPTIONS = {"text_column": "review", "label_column": "sentiment"}


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_clean_error(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@dataclass
class World:
    """Paths the cases are built from: a tiny model and dataset, a finished run store, a saved Fisher."""

    tmp: Path
    model: Path
    data: Path
    runs: Path
    fisher: Path

    def config(self, name: str = "config.yaml", **settings) -> Path:
        data = {
            "model": str(self.model),
            "dataset": str(self.data),
            "dataset_options": OPTIONS,
            "output_dir": str(self.tmp / "out"),
            "methods": ["lora"],
            "budget": {"uniform_rank": 2},
            "train": {"steps": 1, "batch_size": 4, "max_length": 16, "report_to": []},
        }
        data.update(settings)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    def file(self, name: str = "a-file") -> Path:
        path = self.tmp / name
        path.write_text("not a directory\n", encoding="utf-8")
        return path

    def fisher_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.fisher, self.tmp / name))


@pytest.fixture(scope="module")
def saved_fisher(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fisher") / "fisher"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fisher", "--model", str(tiny_bert_dir), "--dataset", str(sentiment_csv),
                "--output", str(directory), "--num-examples", "8", "--text-column", "review",
                "--label-column", "sentiment", "--max-length", "16", "--no-progress",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 0
    return directory


@pytest.fixture
def world(tmp_path, tiny_bert_dir, sentiment_csv, saved_fisher) -> World:
    runs = tmp_path / "runs"
    write_run(runs / "lora", method="lora", seed=0)
    return World(tmp_path, tiny_bert_dir, sentiment_csv, runs, saved_fisher)


def _flip_bytes(world: World) -> Path:
    """16 bytes of Fisher data flipped (the header intact): safetensors itself reads it happily."""
    directory = world.fisher_copy("flipped")
    path = directory / TENSORS_FILE
    raw = bytearray(path.read_bytes())
    start = len(raw) - 64
    raw[start : start + 16] = bytes(b ^ 0xFF for b in raw[start : start + 16])
    path.write_bytes(bytes(raw))
    return directory


def _truncate(world: World, *, checksum: bool) -> Path:
    directory = world.fisher_copy("truncated" + ("" if checksum else "-legacy"))
    path = directory / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:100])
    if not checksum:  # as written before checksums existed: safetensors' own error must be caught
        meta = json.loads((directory / META_FILE).read_text())
        meta.pop("checksums")
        (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def _garbage(world: World) -> Path:
    directory = world.fisher_copy("garbage")
    (directory / TENSORS_FILE).write_bytes(bytes(range(256)) * 20)
    return directory


def _non_utf8_config(world: World) -> Path:
    path = world.tmp / "latin1.yaml"
    path.write_bytes(f"model: {world.model}\ndataset: caf\xe9.csv\n".encode("latin-1"))
    return path


def _text_label_csv(world: World) -> Path:
    """Columns literally named text and label: the names the swap has to exchange."""
    path = world.tmp / "mail.csv"
    rows = [f"message {i} about the meeting on day {i},{'spam' if i % 3 else 'ham'}" for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _latin1_data(world: World) -> Path:
    path = world.tmp / "latin1.csv"
    path.write_bytes("review,sentiment\nfine film,pos\ncafé scene,neg\n".encode("latin-1"))
    return path


def _empty_model(world: World) -> Path:
    (world.tmp / "empty-model").mkdir()
    return world.config(model=str(world.tmp / "empty-model"))


CASES: dict[str, tuple[Callable[[World], list], tuple[str, ...]]] = {
    "swapped text and label columns": (
        lambda w: ["run", w.config(dataset_options={"text_column": "sentiment", "label_column": "review"})],
        ("label column", "swapped"),
    ),
    "swapped columns that are literally named text and label": (
        lambda w: [
            "run",
            w.config(
                dataset=str(_text_label_csv(w)),
                dataset_options={"text_column": "label", "label_column": "text"},
            ),
        ],
        ("label column", "swapped"),
    ),
    "a budget in parameters above what full-rank adapters can spend": (
        lambda w: ["run", w.config(budget={"params": 100_000_000})],
        ("budget.params 100,000,000", "can spend", "at most"),
    ),
    "a uniform rank above the modules' full rank": (
        lambda w: ["run", w.config(budget={"uniform_rank": 1000})],
        ("budget.uniform_rank 1000", "uniform rank 16 at most"),
    ),
    "a data file that is not UTF-8": (
        lambda w: ["run", w.config(dataset=str(_latin1_data(w)))],
        ("latin1.csv", "not UTF-8", "line 3"),
    ),
    "text_column equal to label_column": (
        lambda w: ["run", w.config(dataset_options={"text_column": "review", "label_column": "review"})],
        ("both 'review'",),
    ),
    "output_dir is a file": (
        lambda w: ["run", w.config(output_dir=str(w.file()))],
        ("output_dir", "is a file"),
    ),
    "output_dir cannot be created": (
        lambda w: ["run", w.config(output_dir=str(w.file() / "runs"))],
        ("Cannot create output_dir", "is a file"),
    ),
    "max_length above the model's limit": (
        # The tiny BERT has 64 position embeddings; its tokenizer would allow 512.
        lambda w: ["run", w.config(train={"max_length": 128, "steps": 1})],
        ("train.max_length 128", "64 tokens"),
    ),
    "non-UTF-8 config file": (lambda w: ["run", _non_utf8_config(w)], ("not UTF-8",)),
    "trust_remote_code as the string 'yes'": (
        lambda w: ["run", w.config(trust_remote_code="yes")],
        ("trust_remote_code", "boolean"),
    ),
    "trust_remote_code as the string 'false'": (
        lambda w: ["run", w.config(trust_remote_code="false")],
        ("trust_remote_code", "boolean"),
    ),
    "empty model directory": (lambda w: ["run", _empty_model(w)], ("has no config.json", "empty")),
    "results --out is a file": (lambda w: ["results", w.runs, "--out", w.file()], ("--out", "is a file")),
    "report --out is a file": (lambda w: ["report", w.runs, "--out", w.file()], ("--out", "is a file")),
    "report --baseline without such runs": (
        lambda w: ["report", w.runs, "--out", w.tmp / "report", "--baseline", "dora"],
        ("baseline", "'dora'", "lora"),
    ),
    "allocate --output is a file": (
        lambda w: ["allocate", w.fisher, "--output", w.file()],
        ("--output", "is a file"),
    ),
    "allocate --scaling the config rejects": (
        lambda w: ["allocate", w.fisher, "--output", w.tmp / "a", "--scaling", "alpha_over_r2"],
        ("--scaling", "alpha_over_r, constant, alpha_over_sqrt_r"),
    ),
    "allocate a Fisher with 16 flipped bytes": (
        lambda w: ["allocate", _flip_bytes(w), "--output", w.tmp / "a"],
        ("SHA-256", "corrupted"),
    ),
    "allocate a truncated Fisher": (
        lambda w: ["allocate", _truncate(w, checksum=True), "--output", w.tmp / "a"],
        ("SHA-256",),
    ),
    "allocate a truncated Fisher written before checksums": (
        lambda w: ["allocate", _truncate(w, checksum=False), "--output", w.tmp / "a"],
        ("not a readable safetensors file",),
    ),
    "allocate a garbage Fisher": (
        lambda w: ["allocate", _garbage(w), "--output", w.tmp / "a"],
        ("SHA-256",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, capsys, world):
    build, words = CASES[case]
    code, _, err = run_cli(capsys, *build(world))
    assert_clean_error(code, err, *words)
    assert not (world.tmp / "out").exists()  # a refused run leaves no output_dir behind, not even empty


# Every command, with a path that does not exist and with a file where a directory belongs (and the
# reverse): each is one line naming the path's role.
def _source(w: World, adapter: str, allocation: str) -> Path:
    """A finished run (no weights kept) recorded as the given kind of method."""
    directory = Path(shutil.copytree(w.runs / "lora", w.tmp / f"source-{adapter}"))
    result = json.loads((directory / "result.json").read_text())
    result["method"] = adapter
    result["method_spec"] = {"adapter": adapter, "allocation": allocation}
    (directory / "result.json").write_text(json.dumps(result))
    return directory


def _paths(w: World) -> list[tuple[list, tuple[str, ...]]]:
    missing = w.tmp / "no-such"
    spec = w.tmp / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "defaults": {"dataset_options": OPTIONS, "train": {"steps": 1, "report_to": []}},
                "grid": {"model": [str(w.model)], "dataset": [str(w.data)], "method": ["lora"]},
            }
        ),
        encoding="utf-8",
    )
    fisher = ["fisher", "--model", w.model, "--dataset", w.data, "--text-column", "review"]
    fisher += ["--label-column", "sentiment"]
    return [
        (["run", missing / "c.yaml"], ("Cannot read config",)),
        (["run", w.tmp], ("Cannot read config",)),
        (["run", w.config("to-file.yaml", output_dir=str(w.file()))], ("output_dir", "is a file")),
        ([*fisher[:4], missing / "d.csv", "--output", w.tmp / "f"], ("does not exist",)),
        ([*fisher, "--output", w.file()], ("--output", "is a file")),
        (["fisher", "--model", missing, *fisher[3:], "--output", w.tmp / "f"], ("no-such",)),
        (["allocate", missing, "--output", w.tmp / "a"], ("No Fisher found",)),
        (["allocate", w.file(), "--output", w.tmp / "a"], ("No Fisher found",)),
        (["allocate", w.fisher, "--output", w.file()], ("--output", "is a file")),
        (["methods", missing / "c.yaml"], ("Cannot read config",)),
        (["demo", "--output-dir", w.file()], ("output_dir", "is a file")),
        (["results", missing], ("does not exist",)),
        (["results", w.file()], ("not a directory",)),
        (["results", w.runs, "--out", w.file()], ("--out", "is a file")),
        (["report", missing], ("does not exist",)),
        (["report", w.file()], ("not a directory",)),
        (["report", w.runs, "--out", w.file()], ("--out", "is a file")),
        (["calibration", missing / "c.yaml"], ("Cannot read config",)),
        (["calibration", w.config(), "--out", w.file()], ("--out", "is a file")),
        (["fisher-trajectory", missing / "c.yaml"], ("Cannot read config",)),
        (["fisher-trajectory", w.config(), "--out", w.file()], ("--out", "is a file")),
        (["fisher-trajectory", w.config(), "--source", missing], ("not a finished run",)),
        (["sweep", missing / "s.yaml"], ("Cannot read sweep spec",)),
        (["sweep", w.tmp], ("Cannot read sweep spec",)),
        (["sweep", spec, "--output-dir", w.file()], ("output_dir", "is a file")),
        (["sweep", spec, "--dry-run", "--output-dir", w.file()], ("output_dir", "is a file")),
        (["tune", missing / "s.yaml"], ("Cannot read sweep spec",)),
        (["tune", w.tmp], ("Cannot read sweep spec",)),
        (["export", missing, "--out", w.tmp / "e"], ("does not exist",)),
        (["export", w.file(), "--out", w.tmp / "e"], ("not a directory",)),
        (["export", w.runs, "--out", w.tmp / "e"], ("not a finished run",)),
        (["generate", missing, "--prompt", "Once"], ("does not exist",)),
        (["generate", w.file(), "--prompt", "Once"], ("not a directory",)),
        (["update-spectrum", missing], ("not a finished run",)),
        (["update-spectrum", w.file()], ("not a finished run",)),
        (["update-spectrum", w.runs], ("not a finished run",)),
        (["update-spectrum", _source(w, "lora", "uniform")], ("no adapter/", "train it again")),
        (["update-spectrum", _source(w, "adalora", "adaptive")], ("'adalora'", "only full fine-tuning")),
    ]


def test_every_command_with_bad_paths(capsys, world):
    commands = set()
    for argv, words in _paths(world):
        code, _, err = run_cli(capsys, *argv)
        assert_clean_error(code, err, *words)
        commands.add(argv[0])
    assert commands == set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
