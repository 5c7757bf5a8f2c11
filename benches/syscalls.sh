#!/usr/bin/env bash
# System calls, context switches and CPU per request at a fixed load, HAProxy
# beside ringvip's NodePort path (not a benchmark of speed: a count of what
# each request costs the proxy, stable even on a busy machine). Needs root.
#
#   sudo BIN=target/release/ringvip benches/syscalls.sh [RATE] [SECONDS]
#
# In a network namespace of its own (loopback only): nginx answers HTTP on
# 127.0.0.1:8080; HAProxy (2 threads, mode tcp) listens on 127.0.0.2:80 and
# ringvip (--no-tun, 2 workers) on 127.0.0.3:80. The client is benches/compare.py
# `lat` (RATE requests/s over 10 persistent connections, default 1000 for 5 s),
# run twice per proxy, alternating; `perf stat` counts the proxy's system
# calls, context switches and task clock meanwhile. Then one run of each
# under `perf trace -s` gives the mix of system calls, and one of ringvip
# under strace counts its io_uring_enter calls by ring and by entries
# submitted. Everything it starts is removed on exit.
set -u
cd "$(dirname "$0")/.."
RATE=${1:-1000}
SECS=${2:-5}
BIN=${BIN:-target/release/ringvip}
NS=rvsys$$
W=$(mktemp -d)
cleanup() {
  local p
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
# ringvip serves NodePorts on the node's addresses that --nodeport-addresses
# selects: give loopback 127.0.0.3 as an address of its own.
ip -n "$NS" addr add 127.0.0.3/8 dev lo
cat > "$W/nginx.conf" <<C
worker_processes 1; pid $W/nginx.pid; error_log $W/err.log; daemon off;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:8080; location / { return 200 "hello\n"; } } }
C
ip netns exec "$NS" nginx -c "$W/nginx.conf" -p "$W" &
cat > "$W/haproxy.cfg" <<C
global
  nbthread 2
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen http
  bind 127.0.0.2:80
  server s 127.0.0.1:8080
C
ip netns exec "$NS" haproxy -f "$W/haproxy.cfg" & HAP=$!
mkdir "$W/m"
cat > "$W/m/svc.yaml" <<C
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default}
spec:
  type: NodePort
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, namespace: default, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: ["127.0.0.1"]
  conditions: {ready: true}
C
RINGVIP_LOG=warn ip netns exec "$NS" "$BIN" run --no-handover --manifests "$W/m" --no-tun \
  --nodeport-addresses 127.0.0.3/32 --node-port-range 1-65535 --workers 2 \
  --health-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 & RV=$!
# Precondition, not a measurement: wait until all three answer.
for _ in $(seq 100); do
  ip netns exec "$NS" bash -c 'exec 3<>/dev/tcp/127.0.0.2/80 && exec 4<>/dev/tcp/127.0.0.3/80' 2>/dev/null && break
  sleep 0.1
done
REQS=$((RATE * SECS))
for round in 1 2; do
  for c in haproxy:127.0.0.2:$HAP ringvip:127.0.0.3:$RV; do
    IFS=: read -r name ip pid <<<"$c"
    perf stat -x, -e raw_syscalls:sys_enter,context-switches,task-clock -p "$pid" -o "$W/stat.$name" &
    PS=$!
    lat=$(ip netns exec "$NS" python3 benches/compare.py lat "$ip" 80 "$RATE" "$SECS" 10)
    kill -INT $PS; wait $PS 2>/dev/null
    echo "$name round $round: p50, p99 (µs), requests: $lat; per request: $(awk -F, -v n="$REQS" \
      '!/^#/ && NF > 2 {printf "%s %.2f  ", $3, $1 / n}' "$W/stat.$name")"
  done
done
for c in haproxy:127.0.0.2:$HAP ringvip:127.0.0.3:$RV; do
  IFS=: read -r name ip pid <<<"$c"
  timeout $((SECS + 10)) perf trace -s -p "$pid" -o "$W/trace.$name" 2>/dev/null & T=$!
  sleep 1
  ip netns exec "$NS" python3 benches/compare.py lat "$ip" 80 "$RATE" "$SECS" 10 >/dev/null
  sleep 0.5; kill -INT $T; wait $T 2>/dev/null
  echo "$name: system calls per request"
  awk -v n="$REQS" '$1 ~ /^[a-z_0-9]+$/ && $2 ~ /^[0-9]+$/ {c[$1] += $2}
    END {for (k in c) if (c[k] / n >= 0.01) printf "  %-16s %.2f\n", k, c[k] / n}' "$W/trace.$name" | sort -k2 -nr
done
timeout $((SECS + 10)) strace -f -qq -e trace=io_uring_enter,epoll_wait -p $RV -o "$W/strace" 2>/dev/null & T=$!
sleep 1
ip netns exec "$NS" python3 benches/compare.py lat 127.0.0.3 80 "$RATE" "$SECS" 10 >/dev/null
sleep 0.5; kill -INT $T; wait $T 2>/dev/null
echo "ringvip: io_uring_enter by ring descriptor and entries submitted, per request (under strace)"
grep -o 'io_uring_enter([0-9]*, [0-9]*' "$W/strace" | sort | uniq -c |
  awk -v n="$REQS" '{printf "  %s) %.2f\n", $2 " " $3, $1 / n}'
echo "ringvip: epoll_wait per request $(grep -c 'epoll_wait(' "$W/strace" | awk -v n="$REQS" '{printf "%.2f", $1 / n}')," \
  "interrupted (EINTR) $(grep -c 'EINTR' "$W/strace" | awk -v n="$REQS" '{printf "%.2f", $1 / n}')"
