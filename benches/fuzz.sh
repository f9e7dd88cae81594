#!/usr/bin/env bash
# Runs each fuzz target (src/fuzz.rs) for a bounded time and stops by itself.
#
#   benches/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s each, every target
#
# The targets run under `cargo test` (stable, release build) with bolero's random engine:
# random mutations of the seeds in tests/fuzz/<target>/. A failure prints the input and a
# BOLERO_RANDOM_SEED=... that replays it; add the input to the target's seeds and a regression
# test beside the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(splice chat_count ascii_pieces sse_tap routes_toml admin_json)
fi

failed=()
for target in "${targets[@]}"; do
  echo "== fuzz::$target, ${seconds}s"
  if ! BOLERO_RANDOM_TEST_TIME_MS="$((seconds * 1000))" timeout "$((seconds + 1800))" \
    cargo test --release --lib -q "fuzz::$target" -- --exact --nocapture; then
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "all targets passed"
