#!/usr/bin/env bash
# Memory with many idle connections through a ClusterIP, and new connections
# per second through the VIP beside kernel DNAT. Needs root, python3, iptables.
#
#   sudo benches/tun-memory.sh [CONNECTIONS] [RATE_CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
R=${2:-5000}
BIN=target/release/ringvip
cargo build --release --quiet  # up to date with the tree being measured
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # every connection costs descriptors
. benches/netns-lib.sh
setup_topology 252 7000
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
ip netns exec "$POD" python3 benches/tun_load.py server "$POD_IP" 7000 & PIDS+=($!)
start_ringvip
sleep 1.5
rss() { awk '/VmRSS/ {print $2}' "/proc/$RV/status"; }
echo "# ringvip TUN path, $(date -u +%F), commit $(git rev-parse --short HEAD)"
base=$(rss)
ip netns exec "$NODE" python3 benches/tun_load.py hold 10.96.0.10 7000 "$N" > "$WORK/hold" & PIDS+=($!)
for _ in $(seq 240); do grep -q holding "$WORK/hold" 2>/dev/null && break; sleep 0.5; done
cat "$WORK/hold"
sleep 1
held=$(rss)
echo "RSS idle: ${base} KiB; with $N connections held: ${held} KiB; per connection: $(( (held - base) / N )) KiB"
kill "${PIDS[-1]}" 2>/dev/null || true
sleep 2
echo "new connections/s ($R short connections, 50 at once; connect+ping+pong+close):"
for target in "$POD_IP:direct" 10.96.200.1:DNAT 10.96.0.10:ringvip; do
  ip=${target%%:*}; name=${target##*:}
  echo "  $name: $(ip netns exec "$NODE" python3 benches/tun_load.py rate "$ip" 7000 "$R" 50)"
done
