#!/usr/bin/env bash
# New connections/s through a ClusterIP (2 TUN queues), two ringvip binaries
# alternated A B A B ... in one run: e.g. before and after a change to the
# TUN path. Each round starts the binary, opens N short connections (connect,
# ping, pong, close; 50 at once, tun_load.py rate) and stops it. Needs root,
# python3.
#
#   sudo benches/tun-cps-ab.sh BIN_A BIN_B [ROUNDS] [N]
#
# Every namespace and process it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1; B=$2; ROUNDS=${3:-3}; N=${4:-3000}
. benches/netns-lib.sh
setup_topology 251 7000
ip netns exec "$POD" python3 benches/tun_load.py server "$POD_IP" 7000 & PIDS+=($!)
for _ in $(seq 100); do ip netns exec "$POD" ss -Hltn | grep -q ":7000 " && break; sleep 0.1; done
echo "# benches/tun-cps-ab.sh $ROUNDS $N, $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for which in A B; do
    BIN=$A; [ "$which" = B ] && BIN=$B
    RINGVIP_ARGS="--tun-queues 2" start_ringvip
    for _ in $(seq 100); do ip -n "$NODE" route show | grep -q 10.96.0.0 && break; sleep 0.1; done
    sleep 1
    echo "round $r $which ($BIN): $(ip netns exec "$NODE" python3 benches/tun_load.py rate 10.96.0.10 7000 "$N" 50) conn/s"
    kill "$RV"; wait "$RV" 2>/dev/null || true
  done
done
