#!/usr/bin/env bash
# Installs the system packages the tests, the local stack and the benchmarks use, if they
# are missing. Idempotent: a second run installs nothing.
set -euo pipefail

# binary -> Debian package
declare -A wanted=(
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [clamd]=clamav-daemon
  [sigtool]=clamav
  [wrk]=wrk
  [curl]=curl
)

missing=()
for bin in "${!wanted[@]}"; do
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    missing+=("${wanted[$bin]}")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing: ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
# The packages start system-wide daemons on their default ports; the project never uses
# them (every test and the local stack run private instances on ports of their own).
