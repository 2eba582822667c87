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
WORKERS=${WORKERS:-1}
sweep() { "$FIMLORA" sweep "$@" --workers "$WORKERS" --no-progress; }
# Does the Fisher move during training? Uniform LoRA r = 1 at its tuned rate (seed 0), hindsight ranking
# from full fine-tuning's seed-0 run; skipped once written. Arguments: the task's name in file names.
trajectory() {
  local out=$E/runs/$1-r1/fisher-trajectory source
  [ -f "$out/fisher-trajectory.json" ] && return 0
  source=$(ls -d $E/runs/$1-full-ft/full-ft-*-s0-*)
  "$FIMLORA" fisher-trajectory $E/$1-trajectory.yaml --tuned $E/runs/$1-r1/tuned.yaml \
    --source "$source" --out "$out"
}

# Task 1, MiniLM × movie-reviews: uniform rank 1 (r_min 0), then uniform rank 4.
"$FIMLORA" tune $E/movie-reviews-r1.yaml --workers "$WORKERS"
sweep $E/source-full-ft.yaml            # the hindsight sources, before any hindsight run
sweep $E/source-lora-r8.yaml
sweep $E/movie-reviews-r1.yaml --tuned $E/runs/movie-reviews-r1/tuned.yaml
trajectory movie-reviews
"$FIMLORA" tune $E/movie-reviews-r4.yaml --workers "$WORKERS"
sweep $E/movie-reviews-r4.yaml --tuned $E/runs/movie-reviews-r4/tuned.yaml

# Task 2, MiniLM × brown-genre: its convergence curve (which chose 1,000 steps), its hindsight sources,
# then tuning (lora, fim-lora), the final runs at uniform rank 1 and the Fisher over training.
sweep $E/brown-genre-convergence.yaml
"$FIMLORA" tune $E/brown-genre-r1.yaml --workers "$WORKERS"
sweep $E/brown-genre-source-full-ft.yaml
sweep $E/brown-genre-source-lora-r8.yaml
sweep $E/brown-genre-r1.yaml --tuned $E/runs/brown-genre-r1/tuned.yaml
trajectory brown-genre

"$FIMLORA" results $E/runs --out $E/results
"$FIMLORA" report $E/runs --out $E/report
