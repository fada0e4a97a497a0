#!/usr/bin/env bash
# Build the go-control-plane bench peer (main.go) into a cache directory keyed by its
# sources, go.mod/go.sum and the Go version, and print the binary's path on stdout.
# Modules come from the Go module proxy, checked against the committed go.sum
# (-mod=readonly: a build never edits go.mod/go.sum). A cached binary is reused.
# Exit 1 with the reason on stderr when Go is missing or the build fails: bench/run.py
# then reports the peer as skipped and runs everything else.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v go >/dev/null 2>&1; then
    echo "go-control-plane peer: no 'go' on PATH (Go 1.26 or newer is needed to build it)" >&2
    exit 1
fi
gcp="$(awk '$1 == "github.com/envoyproxy/go-control-plane" {print $2}' "$here/go.mod")"
key="$( (cat "$here/main.go" "$here/go.mod" "$here/go.sum"; go env GOVERSION) | sha256sum | cut -c1-16)"
dir="${MESHLINE_CACHE:-$HOME/.cache/meshline}/peers/go-control-plane-${gcp}-${key}"
bin="$dir/gcp-peer"
if [[ ! -x "$bin" ]]; then
    mkdir -p "$dir"
    echo "go-control-plane peer: building $bin (go-control-plane ${gcp}; first build takes a few minutes)" >&2
    (cd "$here" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin.tmp" .) >&2 || {
        echo "go-control-plane peer: go build failed (above)" >&2
        rm -f "$bin.tmp"
        exit 1
    }
    mv "$bin.tmp" "$bin"
fi
echo "$bin"
