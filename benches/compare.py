"""Helpers for benches/compare (stdlib only).

udp-echo HOST PORT                  echo every datagram back (SO_REUSEPORT, run several)
udp HOST PORT SECS FLOWS WINDOW     UDP request/response: FLOWS sockets, WINDOW datagrams in
                                    flight each; print answered requests per second
udp-gso HOST PORT SECS FLOWS      bulk UDP sent with UDP_SEGMENT: FLOWS sockets, each sending
                                    16 datagrams of 1400 bytes per send (one GSO super-packet)
                                    and waiting for their echoes; print datagrams answered per
                                    second
hold HOST PORT N                    open N HTTP keep-alive connections (one GET each, 100 at once),
                                    hold them idle; print "holding K" (K answered) when done
lat HOST PORT RATE SECS CONNS       HTTP/1.1 GETs over CONNS persistent connections, paced to
                                    RATE requests/s in total; print "p50_us p99_us"; with
                                    LAT_TRACE=FILE also append each request's start
                                    (CLOCK_MONOTONIC, s), duration (µs) and connection to FILE,
                                    to find slow requests on a perf timeline (perf -k mono)
table RESULTS REPS                  aggregate "measure candidate value" lines into the
                                    markdown table (min/median/max, ratios of medians), and
                                    "cpu measure candidate ticks softirq busy units hz" lines
                                    into CPU seconds per GB / per 100k connections
"""
import asyncio
import os
import selectors
import socket
import statistics
import sys
import time


def udp_echo(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, int(port)))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def udp_load(host, port, secs, flows, msg, per_send, sends, setup=None):
    """FLOWS connected sockets, each keeping SENDS sends of MSG in flight (a send
    is PER_SEND datagrams, more than one with UDP_SEGMENT): a send goes out
    whenever a whole send's worth of datagrams came back. Prints datagrams
    answered per second."""
    sel = selectors.DefaultSelector()
    socks, owed, last = [], {}, {}
    for _ in range(int(flows)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if setup:
            setup(s)
        s.connect((host, int(port)))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)

    def fill(s):
        for _ in range(sends):
            try:
                s.send(msg)
            except OSError:
                pass
        owed[s], last[s] = sends * per_send, time.monotonic()

    for s in socks:
        fill(s)
    answered, start = 0, time.monotonic()
    end = start + float(secs)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            for _ in range(64):
                try:
                    s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                answered += 1
                owed[s] -= 1
                if owed[s] <= (sends - 1) * per_send:
                    s.send(msg)
                    owed[s] += per_send
                    last[s] = now
        for s in socks:  # refill a window that lost datagrams (bounded: once per 200 ms)
            if now - last[s] > 0.2:
                fill(s)
    print(f"{answered / (time.monotonic() - start):.0f} {answered}")


def udp(host, port, secs, flows, window):
    udp_load(host, port, secs, flows, b"x" * 64, 1, int(window))


UDP_SEGMENT = 103  # socket.UDP_SEGMENT is Python 3.12+


def udp_gso(host, port, secs, flows, size=1400, burst=16):
    def setup(s):
        s.setsockopt(socket.SOL_UDP, UDP_SEGMENT, size)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    udp_load(host, port, secs, flows, b"g" * (size * burst), burst, 1, setup)


async def lat(host, port, rate, secs, conns):
    conns, interval = int(conns), int(conns) / float(rate)
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    samples = []
    end = time.monotonic() + float(secs)

    async def client(i):
        r, w = await asyncio.open_connection(host, int(port))
        nxt = time.monotonic() + interval * i / conns
        while True:
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= end:
                break
            t = time.monotonic()
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await r.readexactly(length)
            samples.append(time.monotonic() - t)
            starts.append((t, samples[-1], i))
            nxt += interval
        w.close()

    starts = []
    await asyncio.gather(*(client(i) for i in range(conns)))
    if os.environ.get("LAT_TRACE"):
        with open(os.environ["LAT_TRACE"], "a") as f:
            f.writelines(f"{t:.6f} {d * 1e6:.0f} {i}\n" for t, d, i in starts)
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))] * 1e6
    print(f"{q(0.50):.0f} {q(0.99):.0f} {len(samples)}")


async def hold(host, port, n):
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    keep, sem, failed = [], asyncio.Semaphore(100), 0

    async def one():
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
                w.write(req)
                await asyncio.wait_for(r.readuntil(b"ok\n"), 10)
                keep.append(w)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(int(n))))
    print(f"holding {len(keep)} failed {failed}", flush=True)
    await asyncio.sleep(3600)


MEASURES = [  # key, label, unit, higher is better
    ("bulk1up", "bulk 1 stream client→pod", "Gbit/s", True),
    ("bulk1down", "bulk 1 stream client←pod", "Gbit/s", True),
    ("bulk8up", "bulk 8 streams client→pod", "Gbit/s", True),
    ("bulk8down", "bulk 8 streams client←pod", "Gbit/s", True),
    ("cps", "new connections/s (HTTP, Connection: close)", "conn/s", True),
    ("p50", "latency p50 at fixed load", "µs", False),
    ("p99", "latency p99 at fixed load", "µs", False),
    ("udp", "UDP request/response", "req/s", True),
    ("udpgso", "UDP bulk, UDP_SEGMENT sends of 16 × 1400 B, echoed", "datagrams/s", True),
    ("mem", "memory per 10,000 idle connections", "MiB", False),
    # MEASURES=clients: real clients and servers (Debian's redis, PostgreSQL
    # 15, dnsmasq) through each path.
    ("redis-ka", "redis-benchmark GET, keep-alive, 50 clients", "req/s", True),
    ("redis-k0", "redis-benchmark GET, new connection per request (-k 0)", "req/s", True),
    ("redis-p16", "redis-benchmark GET, pipelined 16 deep", "req/s", True),
    ("pg-s", "pgbench select-only, 8 clients", "tps", True),
    ("pg-sc", "pgbench select-only, connection per transaction (-C)", "tps", True),
    ("dnsperf", "dnsperf through a UDP Service (dnsmasq)", "queries/s", True),
    ("dnslost", "dnsperf queries lost", "%", False),
]
CANDIDATES = [
    ("direct", "direct"),
    ("dnat", "iptables DNAT"),
    ("haproxy", "HAProxy"),
    ("nginx", "nginx stream"),
    ("rv-np", "ringvip NodePort"),
    ("rv-cip", "ringvip ClusterIP"),
    ("rv-np-al", "ringvip NodePort, --access-log"),
    ("rv-np-b", "ringvip NodePort, BEFORE= build"),
    ("rv-cip-b", "ringvip ClusterIP, BEFORE= build"),
]


# Traffic measures whose runs also record CPU (benches/compare's meter_end):
# the unit a run's bytes, connections, requests or datagrams are counted in,
# and the row's label when it is not the measure's own.
CPU_UNITS = {
    "bulk1up": ("GB", 1e9, None), "bulk1down": ("GB", 1e9, None),
    "bulk8up": ("GB", 1e9, None), "bulk8down": ("GB", 1e9, None),
    "cps": ("100k connections", 1e5, None),
    "lat": ("100k requests", 1e5, "latency run (1,000 requests/s)"),
    "udp": ("100k datagrams answered", 1e5, None),
    "udpgso": ("100k datagrams answered", 1e5, None),
}


def cpu_table(runs):
    """The CPU table from "cpu MEASURE CAND TICKS SIRQ BUSY UNITS HZ" runs.

    A candidate's figure is its own processes' CPU plus the machine's softirq
    time beyond the direct run's (the median of direct's per unit): the work a
    path adds that can be pinned on it even on a shared machine. For DNAT that
    is all it shows. The last column, the machine's busy time beyond direct's,
    catches the kernel work done in other tasks' context too (DNAT's above
    all), but also anyone else's load."""
    per = {}  # (measure, cand) -> [(process, softirq, busy) seconds per unit]
    for measure, cand, ticks, sirq, busy, units, hz in runs:
        scale = CPU_UNITS[measure][1] / units / hz
        per.setdefault((measure, cand), []).append((ticks * scale, sirq * scale, busy * scale))
    if not per:
        return
    yield ""
    yield ("| CPU seconds per unit | candidate | process + softirq beyond direct "
           "(min / median / max) | ×HAProxy (UDP: ×nginx) | process alone | machine busy beyond direct |")
    yield "| --- | --- | --- | --- | --- | --- |"
    labels = {key: label for key, label, _, _ in MEASURES}
    for key, (unit, _, label) in CPU_UNITS.items():
        label = label or labels[key]
        ref = "haproxy" if (key, "haproxy") in per else "nginx"
        base = per.get((key, "direct"), [])
        base_sirq = statistics.median(s for _, s, _ in base) if base else 0.0
        base_busy = statistics.median(b for _, _, b in base) if base else None
        totals = {c: [p + max(0.0, s - base_sirq) for p, s, _ in per[(key, c)]]
                  for c, _ in CANDIDATES if c != "direct" and (key, c) in per}
        med = {c: statistics.median(v) for c, v in totals.items()}
        if base:
            yield (f"| per {unit}, {label} | direct (the baseline) | softirq **{num(base_sirq)}** | — "
                   f"| — | busy {num(base_busy)} |")
        for c, name in CANDIDATES:
            if c not in totals:
                continue
            v = totals[c]
            proc = statistics.median(p for p, _, _ in per[(key, c)])
            busy = "—"
            if base_busy is not None:
                busy = num(max(0.0, statistics.median(b for _, _, b in per[(key, c)]) - base_busy))
            yield (f"| per {unit}, {label} | {name} | {num(min(v))} / **{num(med[c])}** / "
                   f"{num(max(v))} | {ratio(med, c, ref)} | {num(proc)} | {busy} |")


def num(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(med, c, ref):
    if c not in med or ref not in med or not med[ref] or c == ref:
        return "—"
    return f"{med[c] / med[ref]:.2f}"


def table(path, reps):
    data, runs = {}, []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 8 and parts[0] == "cpu" and parts[1] in CPU_UNITS:
                try:
                    runs.append((parts[1], parts[2], *map(float, parts[3:])))
                except ValueError:
                    pass
                continue
            if len(parts) != 3:
                continue
            try:
                v = float(parts[2])
            except ValueError:
                continue
            if v == v:  # skip nan
                data.setdefault((parts[0], parts[1]), []).append(v)

    print("| measure | candidate | min / median / max | ×HAProxy | ×nginx | ×direct |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, label, unit, _ in MEASURES:
        med = {c: statistics.median(data[(key, c)]) for c, _ in CANDIDATES if data.get((key, c))}
        for c, name in CANDIDATES:
            v = data.get((key, c))
            if not v:
                continue
            n = f" (n={len(v)})" if len(v) != int(reps) else ""
            cell = f"{num(min(v))} / **{num(statistics.median(v))}** / {num(max(v))}{n}"
            print(f"| {label} ({unit}) | {name} | {cell} | {ratio(med, c, 'haproxy')} | "
                  f"{ratio(med, c, 'nginx')} | {ratio(med, c, 'direct')} |")
    for row in cpu_table(runs):
        print(row)


cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "udp-echo":
    udp_echo(*args)
elif cmd == "udp":
    udp(*args)
elif cmd == "udp-gso":
    udp_gso(*args)
elif cmd == "hold":
    asyncio.run(hold(*args))
elif cmd == "lat":
    asyncio.run(lat(*args))
elif cmd == "table":
    table(*args)
else:
    sys.exit(__doc__)
