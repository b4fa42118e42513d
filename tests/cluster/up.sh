#!/usr/bin/env bash
# Starts etcd, kube-apiserver and kube-controller-manager on free loopback
# ports, with all state in DIR. Writes DIR/kubeconfig and DIR/pids; stop it
# with tests/cluster/down.sh DIR. Idempotent: a DIR whose control plane is
# still answering is left as it is.
set -euo pipefail

DIR="${1:?usage: up.sh STATE_DIR}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
BIN_DIR="$CACHE_DIR/k8s/bin"

log() { printf '[cluster] %s\n' "$*" >&2; }

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
if [[ -f "$DIR/kubeconfig" ]] && kubectl --kubeconfig "$DIR/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
  log "already running: $DIR/kubeconfig"
  exit 0
fi
"$HERE/down.sh" "$DIR" >/dev/null 2>&1 || true

"$HERE/build.sh"

# Ports below the kernel's ephemeral range: a port picked inside it can be
# taken by any outgoing connection (etcd's own gateway, a test's HTTP client)
# between the pick and the server's bind.
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
band = range(max(1024, low - 8000), max(1025, low - 4000))
for port in random.sample(band, min(200, len(band))):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
PY
}

write_kubeconfig() {
  local file="$1"
  cat >"$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: tokenkeeper-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $DIR/certs/apiserver.crt
users:
- name: admin
  user:
    token: $ADMIN_TOKEN
contexts:
- name: tokenkeeper-local
  context:
    cluster: tokenkeeper-local
    user: admin
    namespace: default
current-context: tokenkeeper-local
KC
  chmod 600 "$file"
}

if [[ ! -f "$DIR/sa.key" ]]; then
  openssl genrsa -out "$DIR/sa.key" 2048 2>/dev/null
  openssl rsa -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub" 2>/dev/null
fi
ADMIN_TOKEN=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
printf '%s,admin,admin,"system:masters"\n' "$ADMIN_TOKEN" >"$DIR/tokens.csv"
chmod 600 "$DIR/tokens.csv" "$DIR/sa.key"

# Starts etcd and kube-apiserver on fresh ports; fails when the API server
# exits or does not answer /readyz within a minute.
start_etcd_and_apiserver() {
  ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port)
  rm -rf "$DIR/etcd" "$DIR/certs"
  mkdir -p "$DIR/certs" "$DIR/logs"
  : >"$DIR/pids"

  # setsid puts each server in its own session so that a Ctrl-C in the
  # caller's terminal does not kill the control plane behind its back.
  setsid etcd \
    --name default \
    --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    >"$DIR/logs/etcd.log" 2>&1 </dev/null &
  echo "etcd $!" >>"$DIR/pids"

  setsid "$BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --secure-port "$API_PORT" \
    --insecure-port 0 \
    --cert-dir "$DIR/certs" \
    --token-auth-file "$DIR/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/sa.pub" \
    --service-account-signing-key-file "$DIR/sa.key" \
    --api-audiences https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 \
    --enable-priority-and-fairness=false \
    >"$DIR/logs/kube-apiserver.log" 2>&1 </dev/null &
  local apiserver=$!
  echo "kube-apiserver $apiserver" >>"$DIR/pids"

  write_kubeconfig "$DIR/kubeconfig"
  for _ in $(seq 1 120); do
    if kubectl --kubeconfig "$DIR/kubeconfig" get --raw /readyz >/dev/null 2>&1; then return 0; fi
    kill -0 "$apiserver" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

# A port can still be taken by another program between the pick and the
# bind; that attempt is stopped and the next one picks new ports.
for attempt in 1 2 3; do
  if start_etcd_and_apiserver; then break; fi
  if (( attempt < 3 )) && grep -qs "address already in use" "$DIR/logs/etcd.log" "$DIR/logs/kube-apiserver.log"; then
    log "a port was taken before its server bound it; starting again on other ports"
    "$HERE/down.sh" "$DIR"
    continue
  fi
  log "kube-apiserver did not become ready; last lines of the logs:"
  tail -n 30 "$DIR/logs/etcd.log" "$DIR/logs/kube-apiserver.log" >&2
  "$HERE/down.sh" "$DIR"
  exit 1
done

# The controller-manager brings owner-reference garbage collection and
# namespace deletion, which the operator relies on, and ResourceQuota usage,
# which the tests use to make the API server refuse a Secret.
setsid "$BIN_DIR/kube-controller-manager" \
  --kubeconfig "$DIR/kubeconfig" \
  --controllers garbagecollector,namespace,serviceaccount,serviceaccount-token,resourcequota \
  --service-account-private-key-file "$DIR/sa.key" \
  --root-ca-file "$DIR/certs/apiserver.crt" \
  --leader-elect=false \
  --port 0 \
  --secure-port 0 \
  >"$DIR/logs/kube-controller-manager.log" 2>&1 </dev/null &
echo "kube-controller-manager $!" >>"$DIR/pids"

for _ in $(seq 1 60); do
  if kubectl --kubeconfig "$DIR/kubeconfig" get serviceaccount default -n default >/dev/null 2>&1; then break; fi
  sleep 0.5
done
log "control plane ready: export KUBECONFIG=$DIR/kubeconfig"
