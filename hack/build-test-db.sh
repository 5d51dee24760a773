#!/usr/bin/env bash
# Packs the test signatures in testdata/clamav into a versioned, unsigned daily.cud, so that
# clamd's VERSION reports a database version as it does with the official database.
# usage: hack/build-test-db.sh <database dir> [version]
set -euo pipefail
out=${1:?usage: build-test-db.sh <database dir> [version]}
version=${2:-1000}
src=$(cd "$(dirname "$0")/../testdata/clamav" && pwd)
mkdir -p "$out"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp "$src"/* "$build"/
# sigtool asks for the builder's name on stdin.
if ! (cd "$build" && echo virus-scanner | sigtool --build=daily.cud --unsigned \
      --cvd-version="$version" --datadir="$build" >"$build/sigtool.log" 2>&1) \
   || [ ! -f "$build/daily.cud" ]; then
  cat "$build/sigtool.log" >&2
  echo "sigtool could not build the test database" >&2
  exit 1
fi
cp "$build/daily.cud" "$out/.daily.cud.new"
mv "$out/.daily.cud.new" "$out/daily.cud"
