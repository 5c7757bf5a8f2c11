"""Reads a benches/compare timeline: where the latency run's requests wait.

Record one with scheduler events, stamped with the latency client's clock:

    PERF=rv-cip PERF_EVENTS=sched:sched_switch,sched:sched_wakeup,net:netif_receive_skb \
      MEASURES=lat CANDS=rv-cip LAT_TRACE=$PWD/target/lattrace benches/compare 10 1
    perf script -i target/perf-rv-cip-lat.data -F comm,tid,cpu,time,event,trace > target/tl.txt

then

    python3 benches/timeline.py hops target/tl.txt
        for each pair (waker, wakee) among the client, the proxy and the
        backend: how many wake-ups, how many put the wakee on the waker's own
        CPU, and the delay from wake-up to running (p50 / p90 / p99)
    python3 benches/timeline.py slow target/tl.txt target/lattrace.rv-cip
        per request, time each task spent runnable but not on a CPU, and on a
        CPU, summed over the request's window: a median band against the
        slowest 1 %

The proxy is HAProxy's or ringvip's threads (ringvip-tunN, ringvip-dp-N),
the client python3 (benches/compare.py lat), the backend nginx.
"""
import collections
import random
import re
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
WAKEUP = re.compile(r"comm=(.+?) pid=(\d+) prio=\d+ target_cpu=(\d+)")
SWITCH = re.compile(
    r"prev_comm=(.+?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)"
)


def role(comm):
    """A task's part in a request: proxy, client, backend, or its own name."""
    if comm.startswith(("ringvip-tun", "ringvip-dp", "haproxy")):
        return "proxy"
    if comm.startswith("python"):
        return "client"
    if comm.startswith("nginx"):
        return "backend"
    return re.sub(r"\d+$", "", comm)


def events(path):
    for line in open(path):
        m = LINE.match(line)
        if m:
            comm, _tid, cpu, t, name, rest = m.groups()
            yield float(t), int(cpu), comm, name, rest


def pct(v, q):
    return v[min(len(v) - 1, int(len(v) * q))]


def hops(path):
    pending, delays, local = {}, collections.defaultdict(list), collections.Counter()
    for t, cpu, comm, name, rest in events(path):
        if name == "sched:sched_wakeup":
            m = WAKEUP.search(rest)
            if m:
                pending[m.group(2)] = (t, role(comm), role(m.group(1)), int(m.group(3)) == cpu)
        elif name == "sched:sched_switch":
            m = SWITCH.search(rest)
            if m and m.group(5) in pending:
                woke, waker, wakee, same = pending.pop(m.group(5))
                delays[(waker, wakee)].append((t - woke) * 1e6)
                local[(waker, wakee)] += same
    roles = {"proxy", "client", "backend"}
    print("| waker | wakee | wake-ups | on the waker's CPU | to running p50 / p90 / p99 (µs) |")
    print("| --- | --- | --- | --- | --- |")
    for k in sorted(delays, key=lambda k: -len(delays[k])):
        if k[0] not in roles or k[1] not in roles:
            continue
        v = sorted(delays[k])
        print(f"| {k[0]} | {k[1]} | {len(v)} | {local[k] / len(v):.0%} | "
              f"{pct(v, .5):.0f} / {pct(v, .9):.0f} / {pct(v, .99):.0f} |")


def slow(path, trace):
    waiting, running, woke, on = [], [], {}, {}
    for t, _cpu, _comm, name, rest in events(path):
        if name == "sched:sched_wakeup":
            m = WAKEUP.search(rest)
            if m:
                woke.setdefault(m.group(2), (t, m.group(1)))
        elif name == "sched:sched_switch":
            m = SWITCH.search(rest)
            if not m:
                continue
            prev_comm, prev, state, next_comm, nxt = m.groups()
            if prev in on:
                running.append((on.pop(prev), t, prev_comm))
            if state.startswith("R") and not prev_comm.startswith("swapper"):
                woke[prev] = (t, prev_comm)  # preempted: runnable still
            on[nxt] = t
            if nxt in woke:
                since, c = woke.pop(nxt)
                waiting.append((since, t, c))
    reqs = sorted((tuple(map(float, line.split()[:2])) for line in open(trace)), key=lambda r: r[1])
    if not reqs:
        sys.exit("no requests in " + trace)

    def summed(spans, start, end):
        out = collections.Counter()
        for a, b, c in spans:
            o = min(b, end) - max(a, start)
            if o > 0 and not c.startswith("swapper"):
                out[role(c)] += o * 1e6
        return out

    def report(label, sel):
        w, r = collections.Counter(), collections.Counter()
        for t, d in sel:
            end = t + d / 1e6
            w.update(summed((s for s in waiting if s[1] > t and s[0] < end), t, end))
            r.update(summed((s for s in running if s[1] > t and s[0] < end), t, end))
        n = len(sel)
        print(f"{label}: {n} requests, mean {sum(d for _, d in sel) / n:.0f} µs")
        print("  runnable, not on a CPU (µs per request):",
              ", ".join(f"{k} {v / n:.0f}" for k, v in w.most_common(6)))
        print("  on a CPU (µs per request):",
              ", ".join(f"{k} {v / n:.0f}" for k, v in r.most_common(6)))

    n = len(reqs)
    random.seed(1)
    band = range(int(n * 0.4), int(n * 0.6))
    report("median band (40-60 %)", [reqs[i] for i in sorted(random.sample(band, min(200, len(band))))])
    report("slowest 1 %", reqs[int(n * 0.99):])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "hops":
        hops(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "slow":
        slow(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
