#!/usr/bin/env bash
# ClusterIP throughput as connections pile up: one iperf3 stream through a VIP
# with no other connection, then with N idle connections held through another
# VIP of the same ringvip. Needs root, iperf3, python3.
#
#   sudo benches/tun-scale.sh [N]
#
# Every namespace and process it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
BIN=target/release/ringvip
cargo build --release --quiet
ulimit -n "$(ulimit -Hn)"
. benches/netns-lib.sh
setup_topology 253 5201
sed 's/bench/idle/g; s/10.96.0.10/10.96.0.11/; s/5201/7000/g' "$WORK/m.yaml" > "$WORK/m2.yaml"
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
ip netns exec "$POD" python3 benches/tun_load.py server "$POD_IP" 7000 & PIDS+=($!)
ip netns exec "$POD" iperf3 -s -B "$POD_IP" -p 5201 >/dev/null 2>&1 & PIDS+=($!)
start_ringvip
sleep 1.5
run() { ip netns exec "$NODE" iperf3 -c 10.96.0.10 -p 5201 -t 3 -J | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f Gbit/s" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }
echo "# benches/tun-scale.sh $N, $(date -u +%F), commit $(git rev-parse --short HEAD)"
echo "0 idle: $(run)"
ip netns exec "$NODE" python3 benches/tun_load.py hold 10.96.0.11 7000 "$N" > "$WORK/hold" & PIDS+=($!)
for _ in $(seq 240); do grep -q holding "$WORK/hold" 2>/dev/null && break; sleep 0.5; done
cat "$WORK/hold"
echo "$N idle: $(run)"
