#!/usr/bin/env bash
# ClusterIP throughput, side by side in one run: direct connection to the
# backend (the limit), the kernel's DNAT (what kube-proxy's iptables mode does)
# and ringvip's TUN path. Client on the "node", iperf3 server in a "pod"
# namespace across a veth pair. Needs root, iperf3 and iptables.
#
#   sudo benches/tun-compare.sh [SECONDS_PER_RUN] [REPEATS]
#   CLIENT=pod: the iperf3 client runs in a second pod namespace (MTU 1500
#   veth) routed through the node, the way pods reach ClusterIPs.
#
# Every namespace, device and process it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
REPS=${2:-3}
BIN=target/release/ringvip
cargo build --release --quiet  # up to date with the tree being measured
command -v iperf3 >/dev/null && command -v iptables >/dev/null || {
  echo "needs iperf3 and iptables (apt-get install iperf3 iptables)" >&2; exit 1; }

. benches/netns-lib.sh
setup_topology 251 5201
CLIENT_NS=$NODE
if [ "${CLIENT:-node}" = pod ]; then
  setup_client_pod 251 5201
  CLIENT_NS=$CPOD
fi
start_ringvip
ip netns exec "$POD" iperf3 -s -B "$POD_IP" -p 5201 >/dev/null 2>&1 &
PIDS+=($!)
sleep 1

# PERF_OUT=file: profile ringvip (cpu-clock) during one extra 1-stream run, then exit.
if [ -n "${PERF_OUT:-}" ]; then
  perf record -e cpu-clock -F 2000 -g -o "$PERF_OUT" -p "$RV" -- sleep "$SECS" >/dev/null 2>&1 &
  ip netns exec "$CLIENT_NS" iperf3 -c 10.96.0.10 -p 5201 -t "$SECS" | tail -3
  wait %% 2>/dev/null || true
  sleep 1
  exit 0
fi

gbps() { # target streams reverse
  local extra=""; [ "$3" = R ] && extra="-R"
  ip netns exec "$CLIENT_NS" iperf3 -c "$1" -p 5201 -t "$SECS" -P "$2" $extra -J 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' \
    || echo "nan"
}

echo "# ringvip TUN path vs kernel DNAT vs direct, client in the ${CLIENT:-node}, iperf3 ${SECS}s x ${REPS}, $(date -u +%F), commit $(git rev-parse --short HEAD)"
printf "%-22s %-18s %-18s %-18s %s\n" case "direct Gbit/s" "DNAT Gbit/s" "ringvip Gbit/s" "ringvip/DNAT (median)"
for streams in 1 4; do
  for dir in up R; do
    d=(); n=(); r=()
    for _ in $(seq "$REPS"); do  # alternate candidates within each repeat
      d+=("$(gbps "$POD_IP" "$streams" "$dir")")
      n+=("$(gbps 10.96.200.1 "$streams" "$dir")")
      r+=("$(gbps 10.96.0.10 "$streams" "$dir")")
    done
    python3 - "$streams" "$dir" "${d[*]}" "${n[*]}" "${r[*]}" <<'P'
import statistics, sys
s, d = sys.argv[1], sys.argv[2]
cols = [[float(x) for x in a.split()] for a in sys.argv[3:6]]
fmt = lambda v: "%.2f/%.2f/%.2f" % (min(v), statistics.median(v), max(v))
name = "%s stream%s %s" % (s, "s" if s != "1" else "", "client<-pod" if d == "R" else "client->pod")
ratio = statistics.median(cols[2]) / statistics.median(cols[1]) if statistics.median(cols[1]) else float("nan")
print("%-22s %-18s %-18s %-18s %.2f" % (name, fmt(cols[0]), fmt(cols[1]), fmt(cols[2]), ratio))
P
  done
done
echo "(min/median/max per cell)"
