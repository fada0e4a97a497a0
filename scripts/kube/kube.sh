#!/usr/bin/env bash
# A real Kubernetes API server for the tests and the demo: etcd + kube-apiserver (+ kubectl) built from
# the Go module proxy (tools/kube/go.mod pins the versions), cached per version under
# ${MESHLINE_KUBE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/meshline/kube}/<version>/, and run on
# 127.0.0.1 with a service-account signing key, a static admin token and RBAC.
#
#   scripts/kube/kube.sh build         build once (no-op when the cached binaries exist)
#   scripts/kube/kube.sh up            build if needed, start, wait for /readyz, write kubeconfig
#   scripts/kube/kube.sh down          stop what `up` started (by pid file)
#   scripts/kube/kube.sh stop-apiserver  stop only kube-apiserver (`up` starts it again)
#   scripts/kube/kube.sh status        print pids, URL and kubeconfig path; exit 1 when not up
#   scripts/kube/kube.sh env           print KUBECONFIG=... for eval
#   scripts/kube/kube.sh bin-dir       print the directory holding the cached binaries
#   scripts/kube/kube.sh kubectl ARGS  kubectl (built alongside) with the local kubeconfig
#
# Settings (environment): MESHLINE_KUBE_DIR (state: data, certs, logs, kubeconfig;
# default .run/kube/ in the repo, git-ignored), MESHLINE_KUBE_PORT (apiserver, default 16443),
# MESHLINE_ETCD_PORT (client, default 16379; peer = +1), MESHLINE_KUBE_APISERVER_ARGS (extra
# kube-apiserver flags, split on spaces).
# Exit 3 from build/up means "cannot build here" (no Go): callers skip with that reason.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MODDIR="$ROOT/tools/kube"
modver() {  # the version go.mod requires of module $1 (either require form)
    awk -v m="$1" '$1!~/=>/ {for (i = 1; i < NF; i++) if ($i == m && $(i+1) ~ /^v/) {print $(i+1); exit}}' \
        "$MODDIR/go.mod"
}
KUBE_VERSION=$(modver k8s.io/kubernetes)
ETCD_VERSION=$(modver go.etcd.io/etcd/server/v3)
CACHE_ROOT=${MESHLINE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshline/kube}
BIN_DIR="$CACHE_ROOT/$KUBE_VERSION-etcd$ETCD_VERSION"
STATE=${MESHLINE_KUBE_DIR:-$ROOT/.run/kube}
API_PORT=${MESHLINE_KUBE_PORT:-16443}
ETCD_PORT=${MESHLINE_ETCD_PORT:-16379}
ETCD_PEER_PORT=$((ETCD_PORT + 1))
ADMIN_TOKEN_FILE="$STATE/admin.token"

log() { echo "kube: $*" >&2; }

BINS=(kube-apiserver etcd kubectl)
have_bins() { for b in "${BINS[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done; }

build() {
    if have_bins; then
        return 0
    fi
    if ! command -v go >/dev/null 2>&1; then
        log "cannot build: no Go toolchain on PATH (install Go >= 1.26 to run the kube tests)"
        exit 3
    fi
    local gover
    gover=$(go env GOVERSION 2>/dev/null || echo go0)
    if [[ ! "$gover" =~ ^go1\.(2[6-9]|[3-9][0-9]) ]]; then
        log "cannot build: $gover is older than the Go 1.26 that Kubernetes $KUBE_VERSION needs"
        exit 3
    fi
    mkdir -p "$BIN_DIR"
    local lock="$CACHE_ROOT/.build.lock"
    exec 9>"$lock"
    flock 9
    if have_bins; then  # another process built it while we waited
        return 0
    fi
    local major minor date ldflags tmp start
    major=${KUBE_VERSION#v}; major=${major%%.*}
    minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
    date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    ldflags="-s -w"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major"
        ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
    done
    tmp=$(mktemp -d "$BIN_DIR/.build.XXXXXX")
    start=$(date +%s)
    log "building kube-apiserver, kubectl $KUBE_VERSION and etcd $ETCD_VERSION into $BIN_DIR (cold: ~15 min on 2 cores)"
    (
        cd "$MODDIR"
        export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
        for b in "${BINS[@]}"; do
            if [[ -x "$BIN_DIR/$b" ]]; then continue; fi
            case $b in
                etcd) go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" ./etcd ;;
                *) go build -trimpath -ldflags "$ldflags" -o "$tmp/$b" "k8s.io/kubernetes/cmd/$b" ;;
            esac
        done
    )
    for b in "${BINS[@]}"; do
        if [[ -f "$tmp/$b" ]]; then mv "$tmp/$b" "$BIN_DIR/"; fi
    done
    rmdir "$tmp"
    log "built in $(( $(date +%s) - start )) s: $(cd "$BIN_DIR" && du -h "${BINS[@]}" | tr '\t\n' ' ')"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

gen_certs() {
    local pki="$STATE/pki"
    [[ -f "$pki/apiserver.crt" && -f "$pki/sa.key" ]] && return 0
    mkdir -p "$pki"
    if ! command -v openssl >/dev/null 2>&1; then  # the project's venv has `cryptography`
        local py="$ROOT/.venv/bin/python"
        [[ -x "$py" ]] || py=python3
        "$py" "$ROOT/scripts/kube/pki.py" "$pki"
        return 0
    fi
    # Serving CA + serving cert for 127.0.0.1/localhost; service-account signing key.
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=meshline-kube-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' \
        >"$pki/ext.cnf"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 3650 -extfile "$pki/ext.cnf" -out "$pki/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() {
    local token
    token=$(cat "$ADMIN_TOKEN_FILE")
    local ca
    ca=$(base64 -w0 <"$STATE/pki/ca.crt")
    cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: meshline-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca
users:
- name: admin
  user:
    token: $token
contexts:
- name: meshline-local
  context:
    cluster: meshline-local
    user: admin
current-context: meshline-local
EOF
    chmod 600 "$STATE/kubeconfig"
}

ready_once() {  # GET /readyz with the admin token: curl, else the project's Python
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $1" \
            "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
    else
        local py="$ROOT/.venv/bin/python"
        [[ -x "$py" ]] || py=python3
        "$py" -c 'import ssl, sys, urllib.request as u
ctx = ssl.create_default_context(cafile=sys.argv[1])
u.urlopen(u.Request(sys.argv[2], headers={"Authorization": "Bearer " + sys.argv[3]}), context=ctx, timeout=2)' \
            "$STATE/pki/ca.crt" "https://127.0.0.1:$API_PORT/readyz" "$1" >/dev/null 2>&1
    fi
}

wait_ready() {
    local deadline=$(( $(date +%s) + ${1:-90} ))
    local token
    token=$(cat "$ADMIN_TOKEN_FILE")
    while (( $(date +%s) < deadline )); do
        if ! pid_alive "$STATE/etcd.pid"; then
            log "etcd exited; last lines of $STATE/etcd.log:"
            tail -20 "$STATE/etcd.log" >&2
            return 1
        fi
        if ! pid_alive "$STATE/kube-apiserver.pid"; then
            log "kube-apiserver exited; last lines of $STATE/kube-apiserver.log:"
            tail -20 "$STATE/kube-apiserver.log" >&2
            return 1
        fi
        if ready_once "$token"; then
            return 0
        fi
        sleep 0.2
    done
    log "kube-apiserver not ready after ${1:-90} s; see $STATE/kube-apiserver.log"
    return 1
}

start_etcd() {
    pid_alive "$STATE/etcd.pid" && return 0
    mkdir -p "$STATE/etcd-data"
    setsid "$BIN_DIR/etcd" --name meshline-kube --data-dir "$STATE/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "meshline-kube=http://127.0.0.1:$ETCD_PEER_PORT" \
        --quota-backend-bytes=$((1024 * 1024 * 1024)) --log-level warn \
        >>"$STATE/etcd.log" 2>&1 </dev/null &
    echo $! >"$STATE/etcd.pid"
}

start_apiserver() {
    pid_alive "$STATE/kube-apiserver.pid" && return 0
    local pki="$STATE/pki"
    # --enable-admission-plugins: the defaults (NamespaceLifecycle, ServiceAccount, webhooks,
    # ...) minus those that need controllers we do not run are fine as they are.
    setsid "$BIN_DIR/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --client-ca-file "$pki/ca.crt" \
        --token-auth-file "$STATE/tokens.csv" \
        --authorization-mode Node,RBAC \
        --service-account-key-file "$pki/sa.pub" \
        --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --api-audiences https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 10.96.0.0/16 \
        --allow-privileged=true --endpoint-reconciler-type none \
        --enable-priority-and-fairness=false \
        --profiling=false \
        --cert-dir "$pki" \
        --v=1 ${MESHLINE_KUBE_APISERVER_ARGS:-} \
        >>"$STATE/kube-apiserver.log" 2>&1 </dev/null &
    echo $! >"$STATE/kube-apiserver.pid"
}

up() {
    build
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    gen_certs
    if [[ ! -f "$ADMIN_TOKEN_FILE" ]]; then
        head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ADMIN_TOKEN_FILE"
        chmod 600 "$ADMIN_TOKEN_FILE"
    fi
    # Static token file: token,user,uid,"group1,group2" -> admin is a system:masters member.
    printf '%s,meshline-admin,meshline-admin,"system:masters"\n' "$(cat "$ADMIN_TOKEN_FILE")" \
        >"$STATE/tokens.csv"
    write_kubeconfig
    local start ms
    start=$(date +%s%N)
    start_etcd
    start_apiserver
    wait_ready 120
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    log "ready in $((ms / 1000)).$(( (ms % 1000) / 100 )) s at https://127.0.0.1:$API_PORT (kubeconfig: $STATE/kubeconfig)"
    echo "$STATE/kubeconfig"
}

stop_pid() {
    local f=$1
    if pid_alive "$f"; then
        local pid
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    stop_pid "$STATE/kube-apiserver.pid"
    stop_pid "$STATE/etcd.pid"
    log "stopped (state kept in $STATE; remove it for a clean cluster)"
}

status() {
    if pid_alive "$STATE/kube-apiserver.pid" && pid_alive "$STATE/etcd.pid"; then
        echo "kube-apiserver pid $(cat "$STATE/kube-apiserver.pid") https://127.0.0.1:$API_PORT"
        echo "etcd pid $(cat "$STATE/etcd.pid") http://127.0.0.1:$ETCD_PORT"
        echo "kubeconfig $STATE/kubeconfig"
    else
        echo "not running"
        return 1
    fi
}

case ${1:-up} in
    build) build ;;
    up) up ;;
    down) down ;;
    status) status ;;
    stop-apiserver) stop_pid "$STATE/kube-apiserver.pid" ;;
    env) echo "KUBECONFIG=$STATE/kubeconfig" ;;
    bin-dir) echo "$BIN_DIR" ;;
    kubectl) shift; exec "$BIN_DIR/kubectl" --kubeconfig "$STATE/kubeconfig" "$@" ;;
    *) echo "usage: $0 {build|up|down|status|env|bin-dir}" >&2; exit 2 ;;
esac
