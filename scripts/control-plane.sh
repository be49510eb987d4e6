#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for leanserve's end-to-end tests (DESIGN.md section 7).
#
#   scripts/control-plane.sh build      build the pinned binaries once (no-op when present)
#   scripts/control-plane.sh bin        print the binaries directory
#   scripts/control-plane.sh kstatus    print the path of kstatus (object JSON on stdin -> verdict)
#   scripts/control-plane.sh up DIR     start etcd, kube-apiserver, kube-controller-manager,
#                                       kube-scheduler and kwok; write DIR/kubeconfig
#   scripts/control-plane.sh down DIR   stop everything `up DIR` started
#
# Versions are pinned by the wrapper modules in scripts/control-plane/*/go.mod and go.sum.
# Binaries go to ${LEANSERVE_K8S_CACHE:-$HOME/.cache/leanserve/k8s}/<version>/bin.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MODS="$HERE/control-plane"
K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
VERSION="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
CACHE="${LEANSERVE_K8S_CACHE:-$HOME/.cache/leanserve/k8s}"
BIN="$CACHE/$VERSION/bin"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)
# kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status: the rules of Flux's health checks, kpt and
# Config Sync) as a command for the tests; its version is scripts/control-plane/kstatus/go.mod's.
KSTATUS_VERSION="$(awk '$1 == "sigs.k8s.io/cli-utils" {print $2}' "$MODS/kstatus/go.mod")"
KSTATUS="$CACHE/cli-utils-${KSTATUS_VERSION:?no cli-utils in kstatus/go.mod}/bin/kstatus"

die() { echo "control-plane.sh: $*" >&2; exit 1; }

have_binaries() {
    local b
    for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

cmd_build() {
    build_kstatus
    have_binaries && return 0
    command -v go >/dev/null || die "go is not installed; it is needed to build the control plane"
    local tmp start
    start=$(date +%s)
    mkdir -p "$CACHE/$VERSION"
    tmp="$(mktemp -d "$CACHE/$VERSION/bin.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    local vpkg="k8s.io/component-base/version" cpkg="k8s.io/client-go/pkg/version" minor
    minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
    local kver="-X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
    kver+=" -X $vpkg.gitTreeState=clean -X $cpkg.gitVersion=$K8S_VERSION -X $cpkg.gitMajor=1"
    kver+=" -X $cpkg.gitMinor=$minor -X $cpkg.gitTreeState=clean"
    echo "control-plane.sh: building $VERSION into $BIN (takes a while when cold)" >&2
    (cd "$MODS/etcd" && go build -trimpath -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
    (cd "$MODS/kwok" && go build -trimpath -ldflags="-s -w" -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)
    (cd "$MODS/kubernetes" && go build -trimpath -ldflags="-s -w $kver" -o "$tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
    mkdir -p "$BIN"
    local b
    for b in "${BINARIES[@]}"; do mv -f "$tmp/$b" "$BIN/$b"; done
    rm -rf "$tmp"
    trap - EXIT
    echo "control-plane.sh: built in $(( $(date +%s) - start )) s" >&2
}

build_kstatus() {  # seconds when cold (its modules are few; Kubernetes' are the control plane's)
    [ -x "$KSTATUS" ] && return 0
    command -v go >/dev/null || die "go is not installed; it is needed to build kstatus"
    local start
    start=$(date +%s)
    mkdir -p "$(dirname "$KSTATUS")"
    (cd "$MODS/kstatus" && go build -trimpath -ldflags="-s -w" -o "$KSTATUS.tmp.$$" .) \
        || { rm -f "$KSTATUS.tmp.$$"; die "building kstatus failed"; }
    mv -f "$KSTATUS.tmp.$$" "$KSTATUS"
    echo "control-plane.sh: built kstatus $KSTATUS_VERSION in $(( $(date +%s) - start )) s" >&2
}


# ------------------------------------------------------------------------------------ up/down

free_ports() {  # N free loopback TCP ports
    python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

make_certs() {  # CA, API server serving cert, admin client cert, service-account key pair
    local d="$1/pki"
    mkdir -p "$d"
    (
        cd "$d"
        local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
        openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 30 -subj /CN=leanserve-test-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
            2>/dev/null
        openssl req "${ec[@]}" -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
        printf '%s\n' "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
            "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment" > apiserver.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile apiserver.ext -out apiserver.crt 2>/dev/null
        openssl req "${ec[@]}" -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
        printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment" > client.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile client.ext -out admin.crt 2>/dev/null
        openssl ecparam -name prime256v1 -genkey -noout -out sa.key 2>/dev/null
        openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
    )
}

write_kubeconfig() {  # DIR PORT
    local d="$1" b64
    b64() { base64 -w0 < "$1"; }
    cat > "$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: leanserve-test
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority-data: $(b64 "$d/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$d/pki/admin.crt")
    client-key-data: $(b64 "$d/pki/admin.key")
contexts:
- name: leanserve-test
  context: {cluster: leanserve-test, user: admin}
current-context: leanserve-test
EOF
    chmod 600 "$d/kubeconfig"
}

start() {  # DIR NAME ARGS...: run a binary in the background, log to DIR/NAME.log, record its PID
    local d="$1" name="$2"
    shift 2
    setsid "$@" > "$d/$name.log" 2>&1 < /dev/null &
    echo "$! $name" >> "$d/pids"
}

wait_for() {  # DIR WHAT SECONDS CMD...: poll CMD until it succeeds
    local d="$1" what="$2" limit="$3" i
    shift 3
    for ((i = 0; i < limit * 5; i++)); do
        "$@" > /dev/null 2>&1 && return 0
        check_alive "$d" || fail_up "$d" "a component exited while waiting for $what"
        sleep 0.2
    done
    fail_up "$d" "$what not ready within $limit s"
}

alive() {  # running, not a zombie
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

check_alive() {
    local pid name
    while read -r pid name; do
        alive "$pid" || { echo "control-plane.sh: $name (pid $pid) exited" >&2; return 1; }
    done < "$1/pids"
}

fail_up() {
    local d="$1" f
    echo "control-plane.sh: up failed: $2" >&2
    for f in "$d"/*.log; do
        [ -f "$f" ] || continue
        echo "--- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
    cmd_down "$d"
    exit 1
}

# Controllers the tests rely on (garbage collector, namespaces, service accounts and their tokens,
# Job, Deployment, ReplicaSet, TTL-after-finished, pod GC, disruption, resource quota: without it
# no quota's usage is computed and admission refuses everything a quota covers with "status
# unknown for quota" instead of the "exceeded quota" a real cluster gives) and what they need to work
# (claims bound to volumes, the root CA ConfigMap, endpoints for Services, the node lifecycle
# controller that lifts the not-ready taint admission puts on new nodes: kwok renews the nodes'
# Leases, so they stay Ready while kwok runs). The volume binder resyncs every second, not every
# 15 s: a claim created together with its pre-bound volume often finds the volume missing from
# the binder's cache and waited for the next resync (0, 15 or 30 s per claim, measured).
CONTROLLERS=garbage-collector-controller,namespace-controller,serviceaccount-controller
CONTROLLERS+=,serviceaccount-token-controller,job-controller,deployment-controller
CONTROLLERS+=,replicaset-controller,ttl-after-finished-controller,pod-garbage-collector-controller
CONTROLLERS+=,disruption-controller,persistentvolume-binder-controller
CONTROLLERS+=,persistentvolume-protection-controller,persistentvolumeclaim-protection-controller
CONTROLLERS+=,root-ca-certificate-publisher-controller,endpoints-controller
CONTROLLERS+=,endpointslice-controller,clusterrole-aggregation-controller,node-lifecycle-controller
CONTROLLERS+=,resourcequota-controller

untainted() {  # no node has a taint (the node lifecycle controller lifts not-ready)
    local taints
    taints="$("$BIN/kubectl" --kubeconfig="$1" get nodes -o jsonpath='{.items[*].spec.taints}')" \
        && [ -z "$taints" ]
}

cmd_up() {
    local d start ports etcd_client etcd_peer api kcm sched kwok_port
    mkdir -p "$1"
    d="$(cd "$1" && pwd)"
    [ -s "$d/pids" ] && check_alive "$d" 2>/dev/null && die "$d already runs a control plane"
    rm -rf "$d/etcd" "$d/pids" "$d/kwok"
    : > "$d/pids"
    start=$(date +%s.%N)
    read -r etcd_client etcd_peer api kcm sched kwok_port <<< "$(free_ports 6)"
    make_certs "$d"
    write_kubeconfig "$d" "$api"
    local k="$d/kubeconfig" pki="$d/pki"

    start "$d" etcd "$BIN/etcd" --name=leanserve --data-dir="$d/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_client" \
        --advertise-client-urls="http://127.0.0.1:$etcd_client" \
        --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
        --initial-cluster="leanserve=http://127.0.0.1:$etcd_peer" \
        --unsafe-no-fsync --log-level=warn
    start "$d" kube-apiserver "$BIN/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$etcd_client" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --authorization-mode=Node,RBAC \
        --enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" \
        --service-account-signing-key-file="$pki/sa.key" \
        --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
        --cert-dir="$pki" --v=1
    wait_for "$d" "kube-apiserver /readyz" 50 "$BIN/kubectl" --kubeconfig="$k" get --raw=/readyz

    start "$d" kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
        --bind-address=127.0.0.1 --secure-port="$kcm" --leader-elect=false \
        --controllers="$CONTROLLERS" --pvclaimbinder-sync-period=1s \
        --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
        --service-cluster-ip-range=10.0.0.0/24 --v=1
    start "$d" kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
        --bind-address=127.0.0.1 --secure-port="$sched" --leader-elect=false --v=1
    mkdir -p "$d/kwok"
    KWOK_WORKDIR="$d/kwok" start "$d" kwok "$BIN/kwok" --kubeconfig="$k" \
        --config="$MODS/kwok-stages.yaml" \
        --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
        --server-address="127.0.0.1:$kwok_port" --cidr=10.244.0.0/16 --node-ip=127.0.0.1 \
        --node-lease-duration-seconds=40
    "$BIN/kubectl" --kubeconfig="$k" apply -f "$MODS/nodes.yaml" > /dev/null \
        || fail_up "$d" "the fake nodes were refused"
    wait_for "$d" "every node Ready" 40 "$BIN/kubectl" --kubeconfig="$k" wait node --all \
        --for=condition=Ready --timeout=1s
    wait_for "$d" "every node untainted" 30 untainted "$k"
    wait_for "$d" "the default ServiceAccount" 20 "$BIN/kubectl" --kubeconfig="$k" \
        get serviceaccount default -n default
    printf '%s\n' "$api" > "$d/port"
    echo "control-plane.sh: up in $(python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)") s; KUBECONFIG=$k" >&2
}

any_alive() {
    local pid
    for pid in "$@"; do alive "$pid" && return 0; done
    return 1
}

stop_pids() {  # TERM every pid at once, KILL what is left after 5 s, wait until all are gone
    local pid n
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((n = 0; n < 50; n++)); do any_alive "$@" || break; sleep 0.1; done
    for pid in "$@"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
    # Gone from the process table, not merely exited (init reaps the orphans).
    for pid in "$@"; do
        for ((n = 0; n < 50; n++)); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    done
}

cmd_down() {  # stop every process `up` recorded whose command line names DIR: all but etcd
    # together (each takes 1-3 s to exit and be reaped: one by one that was 10 s), then etcd
    local d pid name rest=() store=()
    d="$(cd "$1" 2>/dev/null && pwd)" || return 0
    [ -f "$d/pids" ] || return 0
    while read -r pid name; do
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$d"; then
            if [ "$name" = etcd ]; then store+=("$pid"); else rest+=("$pid"); fi
        fi
    done < "$d/pids"
    stop_pids "${rest[@]}"
    stop_pids "${store[@]}"
    rm -f "$d/pids"
}

case "${1:-}" in
    build) cmd_build ;;
    bin) echo "$BIN" ;;
    kstatus) echo "$KSTATUS" ;;
    up) [ $# -eq 2 ] || die "usage: $0 up DIR"; cmd_build; cmd_up "$2" ;;
    down) [ $# -eq 2 ] || die "usage: $0 down DIR"; cmd_down "$2" ;;
    *) die "usage: $0 build | bin | kstatus | up DIR | down DIR" ;;
esac
