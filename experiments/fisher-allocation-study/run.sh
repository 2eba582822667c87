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

# Task 1, MiniLM × movie-reviews: uniform rank 1 (r_min 0), then uniform rank 4.
"$FIMLORA" tune $E/movie-reviews-r1.yaml --workers "$WORKERS"
sweep $E/source-full-ft.yaml            # the hindsight sources, before any hindsight run
sweep $E/source-lora-r8.yaml
sweep $E/movie-reviews-r1.yaml --tuned $E/runs/movie-reviews-r1/tuned.yaml
"$FIMLORA" tune $E/movie-reviews-r4.yaml --workers "$WORKERS"
sweep $E/movie-reviews-r4.yaml --tuned $E/runs/movie-reviews-r4/tuned.yaml

# Task 2, MiniLM × brown-genre: its convergence curve (which chose 1,000 steps), its hindsight sources,
# then tuning (lora, fim-lora) and the final runs at uniform rank 1.
sweep $E/brown-genre-convergence.yaml
"$FIMLORA" tune $E/brown-genre-r1.yaml --workers "$WORKERS"
sweep $E/brown-genre-source-full-ft.yaml
sweep $E/brown-genre-source-lora-r8.yaml
sweep $E/brown-genre-r1.yaml --tuned $E/runs/brown-genre-r1/tuned.yaml

"$FIMLORA" results $E/runs --out $E/results
"$FIMLORA" report $E/runs --out $E/report
