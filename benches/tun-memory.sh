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
[ -x "$BIN" ] || cargo build --release --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # every connection costs descriptors
ID=$$
NODE=rvmn$ID; POD=rvmp$ID; VN=rvm${ID}n; VP=rvm${ID}p
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NODE" 2>/dev/null || true
  ip netns del "$POD" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NODE"; ip netns add "$POD"
ip link add "$VN" netns "$NODE" type veth peer name "$VP" netns "$POD"
ip -n "$NODE" link set lo up; ip -n "$POD" link set lo up
ip -n "$NODE" addr add 10.252.0.1/24 dev "$VN"; ip -n "$NODE" link set "$VN" up
ip -n "$POD" addr add 10.252.0.2/24 dev "$VP"; ip -n "$POD" link set "$VP" up
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
ip -n "$NODE" route add 10.96.200.1/32 dev "$VN"
ip netns exec "$NODE" iptables -t nat -A OUTPUT -d 10.96.200.1 -p tcp --dport 7000 \
  -j DNAT --to-destination 10.252.0.2:7000
cat > "$WORK/m.yaml" <<Y
apiVersion: v1
kind: Service
metadata: {name: mem, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: p, port: 7000, targetPort: 7000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mem-1, namespace: default, labels: {kubernetes.io/service-name: mem}}
addressType: IPv4
ports: [{name: p, port: 7000, protocol: TCP}]
endpoints:
- addresses: ["10.252.0.2"]
Y
ip netns exec "$POD" python3 benches/tun_load.py server 10.252.0.2 7000 & PIDS+=($!)
RINGVIP_LOG=warn ip netns exec "$NODE" "$BIN" run --manifests "$WORK" --workers 1 \
  --health-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 & RV=$!; PIDS+=($RV)
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
for target in 10.252.0.2:direct 10.96.200.1:DNAT 10.96.0.10:ringvip; do
  ip=${target%%:*}; name=${target##*:}
  echo "  $name: $(ip netns exec "$NODE" python3 benches/tun_load.py rate "$ip" 7000 "$R" 50)"
done
