#!/usr/bin/env bash
# The whole study, in the order of its README's plan; resumable: finished trials and runs are kept, so
# running it again continues where a stop left it (a run in flight re-runs). From anywhere:
#   experiments/fisher-allocation-study/run.sh            # WORKERS=2 for two processes
# `make experiment EXPERIMENT=experiments/fisher-allocation-study` runs it; in a checkout where every
# run is finished it only rebuilds results/ and report/.
set -euo pipefail
cd "$(dirname "$0")/../.."
E=experiments/fisher-allocation-study
FIMLORA=${FIMLORA:-.venv/bin/fimlora}
PYTHON=${PYTHON:-.venv/bin/python}
WORKERS=${WORKERS:-1}
sweep() { "$FIMLORA" sweep "$@" --workers "$WORKERS" --no-progress; }
# What the hindsight rule reads of a source (its updates' σ²), kept beside its result.json and committed,
# since weights are not; runs that have it are skipped. Arguments: source run directories.
spectra() { "$FIMLORA" update-spectrum "$@"; }
# Does the Fisher move during training? Uniform LoRA r = 1 at its tuned rate (seed 0), hindsight ranking
# from full fine-tuning's seed-0 run; skipped once written. Arguments: the task's name in file names.
trajectory() {
  local out=$E/runs/$1-r1/fisher-trajectory source
  [ -f "$out/fisher-trajectory.json" ] && return 0
  source=$(ls -d $E/runs/$1-full-ft/full-ft-*-s0-*/full-ft)
  "$FIMLORA" fisher-trajectory $E/$1-trajectory.yaml --tuned $E/runs/$1-r1/tuned.yaml \
    --source "$source" --out "$out"
}

# The LoRA r = 8 hindsight source of a task trains at the lora cell's rate chosen on validation at r = 1
# (README, change 5); stop before it trains at any other. Arguments: source spec, tuned.yaml.
source_rate_is_tuned() {
  "$PYTHON" - "$1" "$2" <<'PY'
import sys, yaml
spec, tuned = (yaml.safe_load(open(p, encoding="utf-8")) for p in sys.argv[1:3])
rate = float(spec["defaults"]["train"]["learning_rate"])
want = next(c["params"]["train.learning_rate"] for c in tuned["cells"] if c["method"] == "lora")
if abs(rate - want) > 1e-12 * want:
    sys.exit(f"{sys.argv[1]}: learning_rate {rate} is not the lora cell's tuned rate {want} ({sys.argv[2]}); "
             "set it (study README, change 5), then run again")
PY
}

# Task 2's rule for its LoRA r = 8 source's rate (change 5; fixed before brown-genre was tuned): the lora
# cell's validation-ranked rates, checked at r = 8 in turn until one passes; if none does, the source's
# rate is tuned for it (change 14). source_rate_rule.py says how.
source_rate_rule() { "$PYTHON" $E/source_rate_rule.py "$@"; }

# The rule that chose each task's step count from its convergence curve: the first step at which the
# 3-point moving average of validation accuracy (centred) comes within 0.5 points of its maximum. Stops
# unless that step is at most the given one. Arguments: the curve's store, the steps the task trains.
plateau_within() {
  "$PYTHON" - "$1" "$2" <<'PY'
import glob, json, sys
store, steps = sys.argv[1], int(sys.argv[2])
(path,) = glob.glob(f"{store}/*/lora/validation.jsonl")
curve = [json.loads(line) for line in open(path, encoding="utf-8")]
at, accuracy = [p["step"] for p in curve], [p["accuracy"] for p in curve]
average = {at[i]: sum(accuracy[i - 1 : i + 2]) / 3 for i in range(1, len(curve) - 1)}
best = max(average.values())
plateau = min(s for s, a in average.items() if a >= best - 0.005)
print(f"{store}: moving average peaks at {best:.3f}; within 0.5 points from step {plateau}")
if plateau > steps:
    sys.exit(f"{store}: the plateau comes at step {plateau}, after the {steps} steps the task trains: decide "
             "the step count again before its tuning (study README, change 12)")
PY
}

# Every run of the study so far recorded the same library versions (environment.json); a fresh venv
# may install newer ones (PEFT 0.22 arrived mid-study, with the tenth session's new checkout). Stop before
# anything trains unless the installed versions are the recorded ones, so that no cell mixes versions.
# Skipped once the study's last step has run: rebuilding the table and report needs no particular versions.
same_libraries() {
  "$PYTHON" - "$E" <<'PY'
import json, sys
from importlib import metadata
from pathlib import Path
recorded = {}
for path in Path(sys.argv[1]).glob("runs*/**/environment.json"):  # tuning trials are under .tuning/
    for name, version in json.loads(path.read_text(encoding="utf-8"))["packages"].items():
        if name != "fimlora":
            recorded.setdefault(name, set()).add(version)
def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
wrong = {n: (sorted(v), installed(n)) for n, v in recorded.items() if installed(n) not in v}
if wrong:
    pins = " ".join(f"{n}=={sorted(v)[-1].split('+')[0]}" for n, (v, _) in wrong.items())
    sys.exit("the study's runs were made with other library versions than these: "
             + "; ".join(f"{n} {have} installed, runs have {', '.join(v)}" for n, (v, have) in wrong.items())
             + f". Install theirs (.venv/bin/pip install {pins}), then run again (study README, tenth session)")
PY
}
[ -f $E/runs/brown-genre-r1/fisher-trajectory/fisher-trajectory.json ] || same_libraries

# Task 1, MiniLM × movie-reviews: uniform rank 1 (r_min 0), then uniform rank 4.
"$FIMLORA" tune $E/movie-reviews-r1.yaml --workers "$WORKERS"
sweep $E/source-full-ft.yaml            # the hindsight sources, before any hindsight run
spectra $E/runs/movie-reviews-full-ft/*/full-ft
sweep $E/source-lora-r8-rate-check.yaml  # validation only: does that rate train at r = 8 (change 5)?
source_rate_is_tuned $E/source-lora-r8.yaml $E/runs/movie-reviews-r1/tuned.yaml
sweep $E/source-lora-r8.yaml
spectra $E/runs/movie-reviews-lora-r8/*/lora
sweep $E/movie-reviews-r1.yaml --tuned $E/runs/movie-reviews-r1/tuned.yaml
trajectory movie-reviews
# Change 7: both hindsight allocations at their own tuned rate (a spec and store of their own).
"$FIMLORA" tune $E/movie-reviews-r1-own-rate.yaml --workers "$WORKERS"
sweep $E/movie-reviews-r1-own-rate.yaml --tuned $E/runs/movie-reviews-r1-own-rate/tuned.yaml
"$FIMLORA" tune $E/movie-reviews-r4.yaml --workers "$WORKERS"
sweep $E/movie-reviews-r4.yaml --tuned $E/runs/movie-reviews-r4/tuned.yaml

# Task 2, MiniLM × brown-genre, length-grouped batches (change 12): its convergence curve (which chose
# 1,000 steps) and the same curve with grouped batches (do 1,000 steps still reach it?), tuning (lora, fim-lora),
# its hindsight sources (the LoRA r = 8 one at the lora rate, checked on validation first), the own-rate
# hindsight variants' tuning (change 7), the final runs at uniform rank 1 and the Fisher over training.
sweep $E/brown-genre-convergence.yaml
sweep $E/brown-genre-convergence-grouped.yaml   # change 12: the batches task 2 trains with
plateau_within $E/runs-convergence-brown-genre-grouped 1000
"$FIMLORA" tune $E/brown-genre-r1.yaml --workers "$WORKERS"
sweep $E/brown-genre-source-full-ft.yaml
spectra $E/runs/brown-genre-full-ft/*/full-ft
G=$E/runs/brown-genre-r1 CHECKS=$E/runs-source-rate-check-brown-genre
if source_rate_rule exhausted $CHECKS $G/tuning-trials.csv $G/tuned.yaml; then
  # Change 14's last resort, every candidate having failed: the source's own rate, tuned on validation.
  "$FIMLORA" tune $E/brown-genre-source-lora-r8-tune.yaml --workers "$WORKERS"
  source_rate_rule tuned $E/brown-genre-source-lora-r8.yaml $E/runs-source-rate-tune-brown-genre/tuned.yaml
else
  source_rate_rule spec $E/brown-genre-source-lora-r8-rate-check.yaml $CHECKS $G/tuning-trials.csv $G/tuned.yaml
  sweep $E/brown-genre-source-lora-r8-rate-check.yaml
  source_rate_rule holds $CHECKS $G/tuned.yaml
  source_rate_rule spec $E/brown-genre-source-lora-r8.yaml $CHECKS $G/tuning-trials.csv $G/tuned.yaml
fi
sweep $E/brown-genre-source-lora-r8.yaml
spectra $E/runs/brown-genre-lora-r8/*/lora
"$FIMLORA" tune $E/brown-genre-r1-own-rate.yaml --workers "$WORKERS"
sweep $E/brown-genre-r1.yaml --tuned $E/runs/brown-genre-r1/tuned.yaml
sweep $E/brown-genre-r1-own-rate.yaml --tuned $E/runs/brown-genre-r1-own-rate/tuned.yaml
trajectory brown-genre

# Holm per cell (task × budget), as the reading rule fixed before any final run says.
"$FIMLORA" results $E/runs --out $E/results --holm-family budget
"$FIMLORA" report $E/runs --out $E/report --holm-family budget
