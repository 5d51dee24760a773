# Sourced by the scripts that take Go modules through the Go module proxy at pinned versions
# (no release downloads) and cache what they make under ~/.cache/virus-scanner.
export PATH=$PATH:/usr/local/go/bin
export GOFLAGS=-mod=mod
export GOPATH=${GOPATH:-$HOME/go}
cache_root=${VIRUS_SCANNER_CACHE:-$HOME/.cache/virus-scanner}

# module_dir MODULE@VERSION: the module's source directory (downloaded once).
module_dir() {
  go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'
}

# go_install BIN_DIR PACKAGE@VERSION: builds the command into BIN_DIR. Its build cache runs to
# gigabytes and serves nothing else: kept apart and removed after.
go_install() {
  go_install_cache=$(mktemp -d)
  # Also when the build is interrupted.
  trap 'rm -rf "$go_install_cache"' EXIT
  echo "building $2 (into $1)" >&2
  GOCACHE=$go_install_cache GOBIN=$1 go install -trimpath -ldflags="-s -w" "$2" >&2
}
