#!/usr/bin/env bash
# Commit what the study has finished while run.sh goes on: every run with a result.json (final runs,
# sources, tuning trials), tuned.yaml / tuning-trials.csv / fisher-trajectory outputs, and a consistent
# snapshot of each tuning.db taken with SQLite's backup API (a live database copied byte by byte can be
# half-written). Runs still training have no result.json and stay out; a pruned trial leaves none either,
# so add its directory by hand once its study is past it. Never `git commit -a` while tuning.db is live.
#   experiments/fisher-allocation-study/commit-finished.sh "Study: r = 4 tuning, lora trials 0–1"
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 MESSAGE" >&2; exit 2; }
cd "$(dirname "$0")/../.."
E=experiments/fisher-allocation-study
PYTHON=${PYTHON:-.venv/bin/python}
untracked() { git ls-files -o --exclude-standard -- "$E" | grep -E "$1" || true; }
# A run directory is the parent of <method>/result.json; a tuning trial's seed directory likewise.
for f in $(untracked '/result\.json$'); do git add -- "$(dirname "$(dirname "$f")")"; done
# A tuning cell's Fisher record per seed (`.tuning/<study>/seed-N/fisher/fisher.json`; its tensors are
# ignored, as every run's are).
for f in $(untracked '(tuned\.yaml|tuning-trials\.csv|fisher-trajectory\.(json|csv)|/fisher/fisher\.json)$'); do
  git add -- "$f"
done
for f in $(git ls-files -m -- "$E" | grep -E '(tuned\.yaml|tuning-trials\.csv)$' || true); do git add -- "$f"; done
for db in $(find "$E" -name tuning.db); do
  snapshot=$(mktemp)
  "$PYTHON" - "$db" "$snapshot" <<'PY'
import sqlite3, sys
source, target = (sqlite3.connect(p) for p in sys.argv[1:3])
source.backup(target)
target.close()
source.close()
PY
  blob=$(git hash-object -w "$snapshot")
  rm -f "$snapshot"
  git update-index --add --cacheinfo "100644,$blob,$db"
done
git commit -qm "$1"
git log --oneline -1
