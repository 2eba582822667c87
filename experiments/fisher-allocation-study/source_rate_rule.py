"""Task 2's rule for the learning rate of its LoRA r = 8 hindsight source (study README, change 5; the rule
was written in brown-genre-source-lora-r8-rate-check.yaml before brown-genre was tuned).

The candidates are the rates of the lora cell's complete tuning trials at r = 1, best validation
macro-F1 first; the first is the cell's tuned rate. A candidate is trained at r = 8 on seeds 0 and 1,
scored on validation only. It stands if both seeds reach the lora cell's tuned validation macro-F1
minus 0.035; otherwise the next candidate is checked the same way. The two runs of a candidate that
failed are kept in ``<check store>/.rejected-lr-<rate>/`` (hidden: out of the check's own lookup), and
this script re-applies the rule to them before it passes over that candidate.

If every candidate fails, the rule is exhausted, and the source's rate is tuned on validation for the
source itself (change 14's last resort, decided before the last candidates' results:
brown-genre-source-lora-r8-tune.yaml).

    python source_rate_rule.py spec SPEC STORE TRIALS_CSV TUNED  # stop unless SPEC has the candidate due
    python source_rate_rule.py holds STORE TUNED                 # stop unless STORE's check passed
    python source_rate_rule.py exhausted STORE TRIALS_CSV TUNED  # exit 0 iff every candidate failed
    python source_rate_rule.py tuned SPEC SOURCE_TUNED           # stop unless SPEC has the tuned rate
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

MARGIN = 0.035
REJECTED_PREFIX = ".rejected-lr-"


def tuned_lora(tuned: Path) -> dict:
    cells = yaml.safe_load(tuned.read_text(encoding="utf-8"))["cells"]
    return next(c for c in cells if c["method"] == "lora")


def candidates(trials_csv: Path) -> list[float]:
    """Distinct rates of the lora study's complete trials, best validation score first."""
    with trials_csv.open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["method"] == "lora" and r["state"] == "complete"]
    rows.sort(key=lambda r: float(r["value"]), reverse=True)
    rates: list[float] = []
    for row in rows:
        rate = float(row["param.train.learning_rate"])
        if rate not in rates:
            rates.append(rate)
    return rates


def check_failure(runs: Path, rate: float, floor: float) -> str | None:
    """Why the check in ``runs`` (two runs at ``rate``, seeds 0 and 1) fails the rule; None if it passes."""
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(runs.glob("*/lora/result.json"))]
    if any(abs(r["learning_rate"] - rate) > 1e-12 * rate for r in results):
        return f"{runs}: runs at another rate than {rate}"
    scores = {r["seed"]: r["metrics"]["macro_f1"] for r in results}
    if sorted(scores) != [0, 1]:
        return f"{runs}: seeds {sorted(scores)}, the check needs finished runs of seeds 0 and 1"
    if min(scores.values()) < floor:
        return f"{runs}: validation macro-F1 by seed {scores}, the rule asks both >= {floor:.4f}"
    return None


def due_rate(store: Path, trials_csv: Path, tuned: Path) -> float | None:
    """The first candidate whose check has not failed (kept under ``.rejected-lr-<rate>/``); None when
    every candidate's check failed."""
    cell = tuned_lora(tuned)
    floor = cell["validation_score"] - MARGIN
    rates = candidates(trials_csv)
    tuned_rate = cell["params"]["train.learning_rate"]
    if not rates or abs(rates[0] - tuned_rate) > 1e-12 * tuned_rate:
        sys.exit(f"{trials_csv}: its best lora rate is not the tuned one in {tuned}")
    for rate in rates:
        rejected = store / f"{REJECTED_PREFIX}{rate!r}"
        if not rejected.is_dir():
            return rate
        if check_failure(rejected, rate, floor) is None:
            sys.exit(f"{rejected}: passed over, but its runs pass the rule; move them back")
    return None


def spec_rate(spec_path: Path) -> float:
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    return float(spec["defaults"]["train"]["learning_rate"])


def require_rate(spec_path: Path, due: float, what: str) -> None:
    rate = spec_rate(spec_path)
    if abs(rate - due) > 1e-12 * due:
        sys.exit(f"{spec_path}: learning_rate {rate}, {what} is {due!r}; set it, then run again")


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "spec":
        spec_path, store, trials_csv, tuned = map(Path, args)
        due = due_rate(store, trials_csv, tuned)
        if due is None:
            sys.exit(
                f"every lora rate of {trials_csv} failed the check at r = 8: the rate is tuned (change 14)"
            )
        require_rate(spec_path, due, "the rule's candidate due")
    elif command == "exhausted":
        store, trials_csv, tuned = map(Path, args)
        sys.exit(0 if due_rate(store, trials_csv, tuned) is None else 1)
    elif command == "tuned":
        spec_path, source_tuned = map(Path, args)
        require_rate(
            spec_path, tuned_lora(source_tuned)["params"]["train.learning_rate"], "the source's tuned rate"
        )
    elif command == "holds":
        store, tuned = map(Path, args)
        cell = tuned_lora(tuned)
        results = sorted(store.glob("*/lora/result.json"))
        if not results:
            sys.exit(f"{store}: no finished check run")
        rate = json.loads(results[0].read_text(encoding="utf-8"))["learning_rate"]
        failure = check_failure(store, rate, cell["validation_score"] - MARGIN)
        if failure is not None:
            sys.exit(
                f"{failure}. The rule passes over this rate: move the check's runs into "
                f"{store / (REJECTED_PREFIX + repr(rate))}/, set both LoRA r = 8 source specs to the next "
                "candidate (`spec` names it), and run again"
            )
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
