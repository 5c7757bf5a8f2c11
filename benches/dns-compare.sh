#!/usr/bin/env bash
# dnsperf against ringvip's DNS responder and against dnsmasq, in one run, on
# loopback only, each for a bounded time. Both serve the same records: N
# ClusterIP Services as <name>.default.svc.cluster.local A records (ringvip from
# Service manifests, dnsmasq from a hosts-style file), and the query file asks
# for every one of them in turn.
#
#   benches/dns-compare.sh [SERVICES] [SECONDS]     (defaults: 1000 and 10)
#
# Needs: dnsperf and dnsmasq (Debian packages dnsperf, dnsmasq-base).
# Prints one line per server and a Markdown table row for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-1000}
SECS=${2:-10}
if (( SECS < 1 || SECS > 60 )); then
  echo "SECONDS must be 1..60" >&2
  exit 2
fi
for p in dnsperf dnsmasq; do
  if ! command -v "$p" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$p" ]; then
    echo "$p is missing: apt-get install dnsperf dnsmasq-base" >&2
    exit 2
  fi
done
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)

cargo build --release --quiet
BIN=target/release/ringvip

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# A free UDP+TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket
s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

mkdir -p "$WORK/manifests"
: >"$WORK/hosts"
: >"$WORK/queries"
for ((i = 0; i < N; i++)); do
  ip="10.96.$((i / 250)).$((i % 250 + 1))"
  name="svc-$i"
  printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: default}\nspec:\n  clusterIP: %s\n  ports: [{name: http, port: 80}]\n---\n' \
    "$name" "$ip" >>"$WORK/manifests/services.yaml"
  printf '%s %s.default.svc.cluster.local\n' "$ip" "$name" >>"$WORK/hosts"
  printf '%s.default.svc.cluster.local A\n' "$name" >>"$WORK/queries"
done

RV_PORT=$(free_port)
"$BIN" run --no-handover --manifests "$WORK/manifests" --no-tun --workers 1 \
  --health-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --dns-addr "127.0.0.1:$RV_PORT" 2>"$WORK/ringvip.log" &
PIDS+=($!)

DM_PORT=$(free_port)
# No upstreams, no /etc/hosts, no resolv.conf: only the hosts file, from cache.
"$DNSMASQ" --keep-in-foreground --no-daemon --conf-file=/dev/null --no-hosts \
  --addn-hosts="$WORK/hosts" --no-resolv --listen-address=127.0.0.1 \
  --bind-interfaces --port="$DM_PORT" --cache-size=10000 --local-ttl=5 \
  --log-facility="$WORK/dnsmasq.log" --user="$(id -un)" --pid-file= &
PIDS+=($!)

ready() {
  for _ in $(seq 1 100); do
    if dig @127.0.0.1 -p "$1" +time=1 +tries=1 +short svc-0.default.svc.cluster.local A 2>/dev/null | grep -q 10.96.0.1; then
      return 0
    fi
    sleep 0.1
  done
  echo "server on port $1 never answered" >&2
  return 1
}
ready "$RV_PORT"
ready "$DM_PORT"

run() {
  # -c 1 -T 1: one client thread (the machine has 2 cores: one for the server,
  # one for dnsperf); -q 200 queries in flight; -l bounded time.
  dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/queries" -l "$SECS" -c 1 -T 1 -q 200 \
    >"$WORK/$1.out" 2>&1
  local qps lost lat
  qps=$(awk '/Queries per second/ {print $4}' "$WORK/$1.out")
  lost=$(awk '/Queries lost/ {print $3}' "$WORK/$1.out")
  lat=$(awk '/Average Latency/ {print $4}' "$WORK/$1.out")
  printf '%-8s qps=%s lost=%s avg_latency_s=%s\n' "$1" "$qps" "$lost" "$lat"
  eval "${1}_QPS=$qps"
}

echo "dnsperf: $N names, ${SECS}s per server, loopback"
run ringvip "$RV_PORT"
run dnsmasq "$DM_PORT"
# And ringvip once more, so the order of the runs is visible in the figures.
run ringvip2 "$RV_PORT"

COMMIT=$(git rev-parse --short HEAD)
DATE=$(date -u +%F)
echo
echo "| $DATE | $COMMIT | $N A names, ${SECS}s | ringvip ${ringvip_QPS} qps (again: ${ringvip2_QPS}) | dnsmasq ${dnsmasq_QPS} qps |"
