#!/usr/bin/env bash
# The shared CARGO_TARGET_DIR keeps third-party crates built across clones. Cargo decides
# whether the workspace's own crates are fresh by file times, not by checkout path, so a
# clone at another path could reuse artifacts that point into that other checkout (build
# scripts, env!("CARGO_MANIFEST_DIR")). When the checkout changes, the workspace's own
# artifacts are dropped; dependencies stay.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:?CARGO_TARGET_DIR is set by the Makefile}
marker=$target/.checkout
here=$(pwd -P)
if [[ -f $marker && $(cat "$marker") != "$here" ]]; then
  echo "target dir was last used by $(cat "$marker"): rebuilding the workspace crates" >&2
  cargo clean -q --workspace
  cargo clean -q --workspace --release
fi
mkdir -p "$target"
printf '%s\n' "$here" >"$marker"
