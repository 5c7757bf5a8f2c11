#!/usr/bin/env bash
# The cost of forwarding ClusterIP packets between the two processes of a
# handover (issue 14 item 2): one iperf3 stream and one ping/pong connection
# through a VIP are opened on a single ringvip (2 TUN queues); a second one
# takes over (2 more queues) while the first relays them on; then an eBPF
# steering program puts every packet of the device on the new process's
# first queue, so every packet of these flows (the old process's) is read by
# the new process and forwarded to the old one. Prints, per client, the
# median rate of its 1 s (iperf3) or 0.5 s (ping/pong) intervals on the
# single process and once forwarded, and the packets the old process got.
# Needs root, iperf3, python3.
#
#   sudo benches/tun-handover.sh
#
# Every namespace and process it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/ringvip}
[ "${BUILD:-1}" = 1 ] && cargo build --release --quiet
. benches/netns-lib.sh
setup_topology 252 5201
cat >> "$WORK/m.yaml" <<Y
---
$(sed 's/bench/pp/g; s/10.96.0.10/10.96.0.11/; s/5201/7000/g' "$WORK/m.yaml")
Y
ip netns exec "$POD" iperf3 -s -B "$POD_IP" -p 5201 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec "$POD" python3 benches/tun_load.py server "$POD_IP" 7000 & PIDS+=($!)
for _ in $(seq 100); do
  ip netns exec "$POD" ss -Hltn | grep -q ":7000 " && ip netns exec "$POD" ss -Hltn | grep -q ":5201 " && break
  sleep 0.1
done
run_rv() { # run_rv LOG: a ringvip with 2 TUN queues and the handover socket
  RINGVIP_LOG=info ip netns exec "$NODE" "$BIN" run --manifests "$WORK" --workers 1 --tun-queues 2 \
    --health-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --handover "$WORK/h.sock" \
    --drain-timeout-secs 60 2> "$1" &
  PIDS+=($!)
}
run_rv "$WORK/old.log"
for _ in $(seq 100); do grep -q "snapshot published" "$WORK/old.log" && break; sleep 0.1; done
SECS=14
ip netns exec "$NODE" iperf3 -c 10.96.0.10 -p 5201 -t $SECS -i 1 --forceflush --timestamps='%s ' \
  > "$WORK/iperf" 2>&1 & IPERF=$!; PIDS+=($IPERF)
ip netns exec "$NODE" python3 benches/tun_steer.py pingpong 10.96.0.11 7000 $SECS > "$WORK/pp" & PP=$!; PIDS+=($PP)
sleep 5
HANDOVER=$(date +%s.%N)
run_rv "$WORK/new.log"
for _ in $(seq 100); do grep -q "handover complete" "$WORK/new.log" && break; sleep 0.1; done
ip netns exec "$NODE" python3 benches/tun_steer.py steer ringvip0 2
STEERED=$(date +%s.%N)
wait "$IPERF" "$PP" || true
for _ in $(seq 100); do grep -q "TUN packets forwarded" "$WORK/old.log" && break; sleep 0.1; done
echo "# benches/tun-handover.sh, $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD), load average $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/iperf" "$WORK/pp" "$HANDOVER" "$STEERED" <<'P'
import re, statistics, sys
iperf, pp, handover, steered = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
before, after = [], []
for l in open(iperf):
    m = re.match(r"(\d+) \[\s*\d+\]\s+[\d.]+-[\d.]+\s+sec\s+\S+ \S+\s+([\d.]+) (\w)bits/sec", l)
    if not m or "sender" in l or "receiver" in l:
        continue
    t, v = int(m[1]), float(m[2]) * {"G": 1, "M": 1e-3, "K": 1e-6}.get(m[3], 1e-9)
    if t + 1 < handover - 0.5:
        before.append(v)
    elif t - 1 > steered + 0.5:
        after.append(v)
b2, a2 = [], []
for l in open(pp):
    t, n = l.split()
    t, n = float(t), int(n)
    if t < handover - 0.5:
        b2.append(n * 2)
    elif t - 0.5 > steered + 0.5:
        a2.append(n * 2)
med = lambda v: statistics.median(v) if v else float("nan")
print(f"iperf3 1 stream node->pod: single process {med(before):.2f} Gbit/s ({len(before)} s), "
      f"every packet forwarded new->old {med(after):.2f} Gbit/s ({len(after)} s): x{med(after)/med(before):.2f}")
print(f"ping/pong round trips/s on one connection: single process {med(b2):.0f}, "
      f"forwarded {med(a2):.0f}: x{med(a2)/med(b2):.2f}")
P
grep -o "packets_to_peer=[0-9]* packets_from_peer=[0-9]* packets_between_threads=[0-9]*" "$WORK/old.log" | sed 's/^/old process: /'
