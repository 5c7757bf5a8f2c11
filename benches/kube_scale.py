#!/usr/bin/env python3
"""Scale benchmark of the API source (not a test): N Services with M endpoints
each arrive from the fixture API server (integration/support/kube_fixture.py)
by list+watch; measures

  * start -> serving: from spawning `ringvip run --kube` to the first HTTP
    answer through a NodePort (which needs the whole initial list applied:
    ringvip serves nothing before every watch has listed once);
  * RSS of ringvip once serving, and its peak (VmHWM);
  * single endpoint change -> data plane: the probe Service's EndpointSlice is
    flipped between two real backends; time from sending the change to the
    fixture until a new connection through the NodePort lands on the new
    backend (includes the fixture's watch delivery and the client's poll,
    so it is an upper bound of ringvip's part), repeated --changes times;
  * ringvip's own sync duration and network programming metrics;
  * with --churn N: N endpoint changes per second, each to a random
    Service's EndpointSlice (one endpoint's readiness flipped, the slice
    annotated with its change trigger time), for --churn-seconds (30), in
    batches every 20 ms; reports ringvip's network programming latency of
    every change (from its debug log line per sample: trigger time to
    snapshot published, so the fixture's watch delivery is included) as
    percentiles, the changes it applied, and its CPU use over the churn (from
    /proc/PID/stat), with the load average beside.

Only the probe Service's endpoints ever receive traffic (two local HTTP
servers on 127.0.0.1); the generated endpoints are addresses in 10.200.0.0/16
that are programmed but never contacted.

  cargo build --release && python3 benches/kube_scale.py [--services 10000 --endpoints-per-service 10]
      [--churn 1000 --churn-seconds 30]
"""

import argparse
import calendar
import http.client
import http.server
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend(name):
    """An HTTP server answering `backend-<name>`; returns its port."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("backend-%s\n" % name).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


def who(port):
    """Name of the backend answering through 127.0.0.1:port, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        m = re.search(rb"backend-(\w+)", data)
        return m.group(1).decode() if m else None
    except OSError:
        return None


def rfc3339_now():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


def probe_slice(port_a, port_b, target):
    # Two backends on different ports: the slice names one port, one address.
    port = port_a if target == "a" else port_b
    return {
        "metadata": {"name": "probe-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "probe"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": rfc3339_now()}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "protocol": "TCP", "port": port}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}, "nodeName": "node-a"}],
    }


def cluster_ip(i):
    ip = 10 << 24 | 96 << 16 | (i + 10)  # inside 10.96.0.0/12
    return "%d.%d.%d.%d" % (ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255)


def service_slice(i, per_service, not_ready=None, trigger=None):
    """Service i's EndpointSlice; endpoint `not_ready` (an index) not ready."""
    name = "svc-%05d" % i
    eps = []
    for j in range(per_service):
        k = i * per_service + j
        eps.append({"addresses": ["10.200.%d.%d" % (k >> 8 & 255, k & 255)],
                    "conditions": {"ready": j != not_ready},
                    "nodeName": "node-%d" % (k % 50), "zone": "z%d" % (k % 3)})
    meta = {"name": name + "-abcde", "namespace": "ns-%d" % (i % 100),
            "labels": {"kubernetes.io/service-name": name}}
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {"metadata": meta, "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": eps}


def generate(n_services, per_service, node_port, port_a, port_b):
    ops = [{"op": "apply", "resource": "nodes",
            "object": {"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}}}]
    for i in range(n_services):
        ip = cluster_ip(i)
        ops.append({"op": "apply", "resource": "services", "object": {
            "metadata": {"name": "svc-%05d" % i, "namespace": "ns-%d" % (i % 100)},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}}})
        ops.append({"op": "apply", "resource": "endpointslices",
                    "object": service_slice(i, per_service)})
    ops.append({"op": "apply", "resource": "services", "object": {
        "metadata": {"name": "probe", "namespace": "default"},
        "spec": {"type": "NodePort", "ports": [{"name": "p", "protocol": "TCP", "port": 80, "nodePort": node_port}]}}})
    ops.append({"op": "apply", "resource": "endpointslices", "object": probe_slice(port_a, port_b, "a")})
    return ops


def proc_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 (utime, stime) of proc(5), counted after the comm.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def churn(post, n_services, per_service, rate, seconds, rng):
    """`rate` endpoint changes per second over random Services for `seconds`,
    in batches every 20 ms; returns the number sent. What is due is counted
    from the elapsed time, so a batch that took longer than a tick to post is
    made up in the next one rather than lost (the asked rate is reached)."""
    tick = 0.02
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    k = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = int(rate * (now - start)) + 1 - sent
        batch = []
        for _ in range(due):
            i = rng.randrange(n_services)
            k += 1
            batch.append({"op": "apply", "resource": "endpointslices", "object": service_slice(
                i, per_service, not_ready=k % (per_service + 1), trigger=rfc3339_now())})
        if batch:
            post("/batch", batch)
            sent += len(batch)
        k_next = start + tick * (int((time.monotonic() - start) / tick) + 1)
        time.sleep(max(0.0, k_next - time.monotonic()))
    return sent


class Control:
    """POSTs to the fixture's control port on one kept-alive connection (a
    connection per request cost the churn sender its rate)."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def post(self, path, body):
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port)
            try:
                self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                reply = r.read()
                if r.status != 200:
                    sys.exit("fixture %s: HTTP %d" % (path, r.status))
                return json.loads(reply)
            except (OSError, http.client.HTTPException):
                # The server closed the kept-alive connection: once more on a new one.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise


def programming_samples(log, offset):
    """ringvip's network programming samples logged after `offset`: each
    change's latency (trigger time to snapshot published) and the control
    loop's part of it (since the source queued the change), sorted, in s."""
    log.flush()
    with open(log.name) as f:
        f.seek(offset)
        logged = f.read()
    found = lambda field: sorted(int(m.group(1)) / 1e6 for m in re.finditer(field + r"=(\d+)", logged))
    return found(r"\blatency_us"), found("since_queued_us")


def parse_rfc3339(text):
    """Seconds since the epoch of `rfc3339_now()`'s form."""
    whole, frac = text.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1e6


def watch_probe(api_port, rv):
    """A second watcher of EndpointSlices beside ringvip, in a process of its
    own, until SIGTERM: prints, as JSON, how long after its trigger time each
    changed slice's event reached it, the probe Service's changes and the
    churn's apart. That is the fixture's own delivery (and this machine's
    scheduling), the part of ringvip's programming latency not ringvip's."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    s = socket.create_connection(("127.0.0.1", api_port))
    s.sendall(b"GET /apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=%d "
              b"HTTP/1.1\r\nHost: fixture\r\n\r\n" % rv)
    s.settimeout(0.2)
    out, rest = {"changes": [], "churn": []}, b""
    marker = b'"endpoints.kubernetes.io/last-change-trigger-time":"'
    while not stop:
        try:
            data = s.recv(1 << 20)
        except (socket.timeout, InterruptedError):
            continue
        if not data:
            break
        now = time.time()
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        # Chunk sizes and chunk ends are lines of their own; events are JSON
        # lines (no newline inside), found by their trigger annotation.
        for line in lines:
            i = line.find(marker)
            if i >= 0:
                j = i + len(marker)
                d = now - parse_rfc3339(line[j:line.index(b'"', j)].decode())
                out["churn" if b'"name":"svc-' in line else "changes"].append(d)
    print(json.dumps(out))


def list_rv(api_port):
    """The fixture's current resourceVersion (a one-item list's)."""
    url = "http://127.0.0.1:%d/apis/discovery.k8s.io/v1/endpointslices?limit=1" % api_port
    return int(json.loads(urllib.request.urlopen(url).read())["metadata"]["resourceVersion"])


def percentile(sorted_values, f):
    return sorted_values[min(len(sorted_values) - 1, int(f * len(sorted_values)))]


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints-per-service", type=int, default=10)
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--ringvip", default=os.path.join(ROOT, "target/release/ringvip"))
    p.add_argument("--churn", type=int, default=0, help="endpoint changes per second (0: no churn)")
    p.add_argument("--churn-seconds", type=float, default=30)
    p.add_argument("--dns", action="store_true",
                   help="also serve cluster DNS (--dns-addr on a free loopback port): every change updates the zone")
    p.add_argument("--watch-probe", action="store_true",
                   help="with --churn: a second watcher beside ringvip timestamps each churned event on"
                   " receipt (the fixture's own delivery latency, reported apart)")
    p.add_argument("--probe-only", nargs=2, type=int, metavar=("API_PORT", "RV"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe_only:
        watch_probe(*a.probe_only)
        return

    tmp = tempfile.mkdtemp(prefix="ringvip-kube-scale-")
    port_a, port_b = backend("a"), backend("b")
    node_port = free_port()
    ops = generate(a.services, a.endpoints_per_service, node_port, port_a, port_b)
    load = os.path.join(tmp, "preload.json")
    with open(load, "w") as f:
        json.dump(ops, f)
    fixture = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "integration/support/kube_fixture.py"), "--dir", tmp,
         "--load", load, "--stdin", "--bookmark-interval", "5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    info = json.loads(fixture.stdout.readline())

    post = Control(info["control"]).post

    health, metrics_port = free_port(), free_port()
    log = open(os.path.join(tmp, "ringvip.log"), "w")
    fixture_cpu0 = cpu_seconds(fixture.pid)  # its preload is not start-up
    t0 = time.monotonic()
    rv = subprocess.Popen(
        [a.ringvip, "run", "--no-handover", "--kube", "--kubeconfig", info["kubeconfig"], "--node-name", "node-a",
         "--no-tun", "--nodeport-addresses", "127.0.0.1/32", "--node-port-range", "1-65535",
         "--health-addr", "127.0.0.1:%d" % health, "--metrics-addr", "127.0.0.1:%d" % metrics_port]
        + (["--dns-addr", "127.0.0.1:%d" % free_port()] if a.dns else []),
        stdout=subprocess.DEVNULL, stderr=log,
        env=dict(os.environ, RINGVIP_LOG=os.environ.get("KUBE_SCALE_LOG", "warn,ringvip::programming=debug")))
    try:
        while who(node_port) != "a":
            if time.monotonic() - t0 > 120:
                sys.exit("not serving after 120 s; log in %s" % tmp)
            time.sleep(0.002)
        serving = time.monotonic() - t0
        # Who used the two cores until then: ringvip (decoding, converting,
        # compiling) against the fixture (serving the lists).
        cpu_at_serving = (cpu_seconds(rv.pid), cpu_seconds(fixture.pid) - fixture_cpu0)
        time.sleep(1)
        rss_serving = proc_kib(rv.pid, "VmRSS")

        before = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port).read().decode()
        latencies = []
        target = "a"
        probe = None
        if a.watch_probe:
            probe = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--probe-only", str(info["api"]),
                                      str(list_rv(info["api"]))], stdout=subprocess.PIPE)
            time.sleep(0.5)  # its watch is open before the first change
        log.flush()
        changes_offset = os.path.getsize(log.name)
        for _ in range(a.changes):
            target = "b" if target == "a" else "a"
            start = time.monotonic()
            post("/apply", {"resource": "endpointslices", "object": probe_slice(port_a, port_b, target)})
            while who(node_port) != target:
                if time.monotonic() - start > 30:
                    sys.exit("change never reached the data plane")
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port).read().decode()
        # ringvip's own account of each of those changes (trigger time to
        # snapshot published; the fixture's delivery inside), from its log.
        changed = programming_samples(log, changes_offset)
        rss_end = proc_kib(rv.pid, "VmRSS")
        hwm = proc_kib(rv.pid, "VmHWM")
        churned = None
        if a.churn:
            import random
            log.flush()
            offset = os.path.getsize(log.name)
            load_before = os.getloadavg()
            cpu0, t0c = cpu_seconds(rv.pid), time.monotonic()
            sent = churn(post, a.services, a.endpoints_per_service, a.churn, a.churn_seconds,
                         random.Random(17))
            elapsed = time.monotonic() - t0c
            cpu_busy = (cpu_seconds(rv.pid) - cpu0) / elapsed
            # Let the last changes arrive; then every sample is in the log.
            time.sleep(2)
            cpu_all = (cpu_seconds(rv.pid) - cpu0) / (time.monotonic() - t0c)
            load_after = os.getloadavg()
            samples, queued = programming_samples(log, offset)
            churned = (sent, elapsed, cpu_busy, cpu_all, samples, queued, load_before, load_after)
        probed = {}
        if probe:
            probe.terminate()
            probed = {k: sorted(v) for k, v in json.loads(probe.communicate()[0]).items()}
    finally:
        rv.terminate()
        rv.wait()
        fixture.kill()
        fixture.wait()

    latencies.sort()

    def delivery(lat):
        if lat:
            print("  the fixture's delivery to a second watcher (%d events): median %s, p90 %s, p99 %s, max %s" % (
                len(lat), ms(percentile(lat, 0.5)), ms(percentile(lat, 0.9)), ms(percentile(lat, 0.99)), ms(lat[-1])))
    ms = lambda s: "%.1f ms" % (s * 1000)
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))]
    first_s = metric(before, "ringvip_sync_proxy_rules_duration_seconds_sum")
    first_n = metric(before, "ringvip_sync_proxy_rules_duration_seconds_count")
    # The syncs of the changes only (the initial full sync is reported apart).
    sync_n = metric(text, "ringvip_sync_proxy_rules_duration_seconds_count") - first_n
    sync_s = metric(text, "ringvip_sync_proxy_rules_duration_seconds_sum") - first_s
    np_n = metric(text, "ringvip_network_programming_duration_seconds_count")
    np_s = metric(text, "ringvip_network_programming_duration_seconds_sum")
    print("ringvip log: %s" % log.name)
    print("services %d, endpoints %d (+1 probe Service)" % (a.services, a.services * a.endpoints_per_service))
    print("start -> serving:            %.2f s (CPU until then: ringvip %.2f s, fixture %.2f s; load %.2f)" % (
        serving, cpu_at_serving[0], cpu_at_serving[1], os.getloadavg()[0]))
    print("RSS serving / after changes: %.0f MiB / %.0f MiB (peak %.0f MiB; two scrapes of /metrics inside, %.1f MB each)" % (
        rss_serving / 1024, rss_end / 1024, hwm / 1024, len(text) / 1e6))
    print("endpoint change -> new endpoint gets connections (%d changes): median %s, p90 %s, max %s" % (
        len(latencies), ms(statistics.median(latencies)), ms(q(0.9)), ms(latencies[-1])))
    if changed[0]:
        lat, que = changed
        print("  ringvip's programming latency of those changes (trigger -> published): median %s, p90 %s, p99 %s, max %s;"
              " since its source queued them: median %s, p99 %s" % (
                  ms(percentile(lat, 0.5)), ms(percentile(lat, 0.9)), ms(percentile(lat, 0.99)), ms(lat[-1]),
                  ms(percentile(que, 0.5)), ms(percentile(que, 0.99))))
    delivery(probed.get("changes"))
    if sync_n:
        print("ringvip sync duration (compile + publish): initial %s (%d syncs), then mean %s over %d syncs" % (
            ms(first_s), first_n, ms(sync_s / sync_n), sync_n))
    if np_n:
        print("ringvip network programming duration: mean %s over %d changes" % (ms(np_s / np_n), np_n))
    if churned:
        sent, elapsed, cpu_busy, cpu_all, samples, queued, lb, la = churned
        print("churn: %d changes sent over %.1f s (%.0f/s asked, %.0f/s sent); load average %.2f before, %.2f after" % (
            sent, elapsed, a.churn, sent / elapsed, lb[0], la[0]))
        if samples:
            print("churn programming latency (%d samples): median %s, p90 %s, p99 %s, max %s" % (
                len(samples), ms(percentile(samples, 0.5)), ms(percentile(samples, 0.9)),
                ms(percentile(samples, 0.99)), ms(samples[-1])))
        if queued:
            print("  of which since ringvip's source queued it: median %s, p90 %s, p99 %s, max %s" % (
                ms(percentile(queued, 0.5)), ms(percentile(queued, 0.9)),
                ms(percentile(queued, 0.99)), ms(queued[-1])))
        delivery(probed.get("churn"))
        print("ringvip CPU during churn: %.0f%% of one core (%.0f%% including 2 s after)" % (
            cpu_busy * 100, cpu_all * 100))


if __name__ == "__main__":
    main()
