#!/usr/bin/env bash
# Runs the whole suite N times in a row (default 10) with a CPU hog beside it, the way a slow,
# loaded CI machine would; stops at the first failing run. Prints one line per run.
#
#   bash scripts/stress-test.sh [runs]        NODE_BIN=/path/to/node/bin to use another Node
#
# The hog is `stress-ng --cpu 2` when installed, two busy node processes otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
[ -n "${NODE_BIN:-}" ] && export PATH="$NODE_BIN:$PATH"
hogs=()
stop_hogs() { for p in "${hogs[@]}"; do kill "$p" 2>/dev/null; done; }
trap stop_hogs EXIT
if command -v stress-ng >/dev/null 2>&1; then
  stress-ng --cpu 2 --quiet & hogs+=($!)
else
  node -e 'for(;;);' & hogs+=($!)
  node -e 'for(;;);' & hogs+=($!)
fi
mkdir -p test/artifacts
echo "node $(node --version), hog: $(command -v stress-ng >/dev/null && echo 'stress-ng --cpu 2' || echo '2 × node busy loop'), $runs runs"
for i in $(seq 1 "$runs"); do
  log="test/artifacts/stress-run-$i.log"
  start=$(date +%s)
  if make test >"$log" 2>&1; then verdict=passed; else verdict=FAILED; fi
  summary=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^ +Tests ' | tail -1 | sed 's/^ *//')
  echo "run $i: $verdict in $(( $(date +%s) - start )) s — $summary"
  if [ "$verdict" = FAILED ]; then
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E 'FAIL|×' | head -10
    exit 1
  fi
done
