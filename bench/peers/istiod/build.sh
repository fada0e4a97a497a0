#!/usr/bin/env bash
# Build istiod's discovery server (istio.io/istio/pilot/cmd/pilot-discovery) for the bench
# into a cache directory keyed by the istio pseudo-version and the Go version, and print
# the binary's path on stdout. The module and its dependencies come from the Go module
# proxy, checked against istio's own go.sum and the checksum database (`go install
# pkg@version` builds with istio's go.mod unchanged; nothing of ours pins its deps).
# A cached binary is reused. A cold build takes ~35 minutes on 2 cores, so it runs at
# nice 19. Exit 1 with the reason on stderr when Go is missing or the build fails:
# bench/run.py then reports the istiod peer as skipped and runs everything else.
set -euo pipefail
version="${MESHLINE_ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
if ! command -v go >/dev/null 2>&1; then
    echo "istiod peer: no 'go' on PATH (Go 1.26 or newer is needed to build pilot-discovery)" >&2
    exit 1
fi
key="$( (echo "$version"; go env GOVERSION GOOS GOARCH) | sha256sum | cut -c1-16)"
dir="${MESHLINE_CACHE:-$HOME/.cache/meshline}/peers/istiod-${version}-${key}"
bin="$dir/pilot-discovery"
if [[ ! -x "$bin" ]]; then
    mkdir -p "$dir/tmp"
    echo "istiod peer: building $bin (istio.io/istio@${version}; a cold build takes ~35 minutes)" >&2
    GOBIN="$dir/tmp" GOFLAGS=-mod=mod GOPROXY="${GOPROXY:-https://proxy.golang.org}" \
        nice -n 19 go install -trimpath \
        "istio.io/istio/pilot/cmd/pilot-discovery@${version}" >&2 || {
        echo "istiod peer: go install istio.io/istio/pilot/cmd/pilot-discovery@${version} failed (above)" >&2
        rm -rf "$dir/tmp"
        exit 1
    }
    mv "$dir/tmp/pilot-discovery" "$bin"
    rmdir "$dir/tmp"
fi
# Istio's CRDs of the same version, next to the binary (bench/peers/istiod.py applies them to
# the API server): the module is in the module cache after the build.
crds="$dir/crd-all.gen.yaml"
if [[ ! -s "$crds" ]]; then
    src="$(GOFLAGS=-mod=mod go mod download -json "istio.io/istio@${version}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    if [[ -z "$src" || ! -s "$src/manifests/charts/base/files/crd-all.gen.yaml" ]]; then
        echo "istiod peer: istio.io/istio@${version} has no manifests/charts/base/files/crd-all.gen.yaml" >&2
        exit 1
    fi
    cp "$src/manifests/charts/base/files/crd-all.gen.yaml" "$crds.tmp"
    mv "$crds.tmp" "$crds"
fi
echo "$bin"
