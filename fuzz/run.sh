#!/usr/bin/env bash
# Usage: fuzz/run.sh TARGET [SECONDS] [extra libFuzzer flags...]
# Copies the committed seeds into the (ignored) working corpus, then fuzzes TARGET for SECONDS (240).
set -euo pipefail
cd "$(dirname "$0")"
target=$1
secs=${2:-240}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "corpus/$target" "artifacts/$target"
if [ -d "seeds/$target" ]; then cp -n "seeds/$target"/* "corpus/$target"/ 2>/dev/null || true; fi
RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=1 cargo fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="artifacts/$target/" "$@"
