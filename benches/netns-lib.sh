# Sourced by the namespace benchmarks. `setup_topology NET PORT` creates a
# "node" and a "pod" namespace joined by a veth pair (node 10.NET.0.1, pod
# 10.NET.0.2), a kernel-DNAT VIP 10.96.200.1:PORT -> pod (what kube-proxy's
# iptables mode programs) and a manifest for ringvip's VIP 10.96.0.10:PORT ->
# pod in $WORK. `start_ringvip` runs ringvip in the node namespace. Everything,
# including processes appended to PIDS, is removed on exit.
ID=$$
NODE=rvbn$ID; POD=rvbp$ID; VN=rvb${ID}n; VP=rvb${ID}p
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NODE" 2>/dev/null || true
  ip netns del "$POD" 2>/dev/null || true
  [ -n "${CPOD:-}" ] && ip netns del "$CPOD" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

setup_topology() {
  local net=$1 port=$2
  POD_IP=10.$net.0.2
  ip netns add "$NODE"; ip netns add "$POD"
  ip link add "$VN" netns "$NODE" type veth peer name "$VP" netns "$POD"
  ip -n "$NODE" link set lo up; ip -n "$POD" link set lo up
  ip -n "$NODE" addr add "10.$net.0.1/24" dev "$VN"; ip -n "$NODE" link set "$VN" up
  ip -n "$POD" addr add "$POD_IP/24" dev "$VP"; ip -n "$POD" link set "$VP" up
  ip -n "$NODE" route add 10.96.200.1/32 dev "$VN"
  ip netns exec "$NODE" iptables -t nat -A OUTPUT -d 10.96.200.1 -p tcp --dport "$port" \
    -j DNAT --to-destination "$POD_IP:$port"
  cat > "$WORK/m.yaml" <<Y
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: p, port: $port, targetPort: $port}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bench-1, namespace: default, labels: {kubernetes.io/service-name: bench}}
addressType: IPv4
ports: [{name: p, port: $port, protocol: TCP}]
endpoints:
- addresses: ["$POD_IP"]
Y
}

# setup_client_pod NET PORT: a second pod namespace ($CPOD, 10.NET.1.2, MTU
# 1500 veth) whose traffic to the service CIDR is routed through the node, as a
# pod's is on a Kubernetes node; kernel DNAT then needs PREROUTING too.
setup_client_pod() {
  local net=$1 port=$2
  CPOD=rvbc$ID
  ip netns add "$CPOD"
  ip link add "rvb${ID}c" netns "$NODE" type veth peer name "rvb${ID}q" netns "$CPOD"
  ip -n "$CPOD" link set lo up
  ip -n "$NODE" addr add "10.$net.1.1/24" dev "rvb${ID}c"; ip -n "$NODE" link set "rvb${ID}c" up
  ip -n "$CPOD" addr add "10.$net.1.2/24" dev "rvb${ID}q"; ip -n "$CPOD" link set "rvb${ID}q" up
  ip -n "$CPOD" route add default via "10.$net.1.1"
  ip -n "$POD" route add "10.$net.1.0/24" via "10.$net.0.1"
  ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$NODE" iptables -t nat -A PREROUTING -d 10.96.200.1 -p tcp --dport "$port" \
    -j DNAT --to-destination "$POD_IP:$port"
}

# start_ringvip: ringvip in the node namespace; RINGVIP_ARGS adds flags
# (e.g. RINGVIP_ARGS="--tun-queues 1").
start_ringvip() {
  # shellcheck disable=SC2086 # RINGVIP_ARGS is a list of flags
  RINGVIP_LOG=warn ip netns exec "$NODE" "$BIN" run --no-handover --manifests "$WORK" --workers 1 \
    --health-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 ${RINGVIP_ARGS:-} &
  RV=$!
  PIDS+=("$RV")
}
