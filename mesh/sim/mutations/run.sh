#!/usr/bin/env bash
# Mutation check: put each known bug back, one at a time, and count how many of the first
# SEEDS (default 300) simulator seeds catch it. Run from the project's root on a clean tree.
set -euo pipefail
SEEDS=${SEEDS:-300}
cd "$(dirname "$0")/../../.."
git diff --quiet || { echo "the tree has changes; commit or stash them first" >&2; exit 2; }
for patch in mesh/sim/mutations/*.patch; do
  git apply "$patch"
  trap 'git apply -R "$patch"' EXIT
  cargo build -q -p mesh-sim --release
  line=$(target/release/mesh-sim --seeds "$SEEDS" | grep "^seeds " || true)
  failed=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
  git apply -R "$patch"
  trap - EXIT
  printf '%-50s caught by %4d of %d seeds (%.1f%%)\n' "$(basename "$patch" .patch)" \
    "$failed" "$SEEDS" "$(echo "100 * $failed / $SEEDS" | bc -l)"
done
cargo build -q -p mesh-sim --release
