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
  * ringvip's own sync duration and network programming metrics.

Only the probe Service's endpoints ever receive traffic (two local HTTP
servers on 127.0.0.1); the generated endpoints are addresses in 10.200.0.0/16
that are programmed but never contacted.

  cargo build --release && python3 benches/kube_scale.py [--services 10000 --endpoints-per-service 10]
"""

import argparse
import http.server
import json
import os
import re
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


def generate(n_services, per_service, node_port, port_a, port_b):
    ops = [{"op": "apply", "resource": "nodes",
            "object": {"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}}}]
    for i in range(n_services):
        ip = 10 << 24 | 96 << 16 | (i + 10)  # inside 10.96.0.0/12
        cluster_ip = "%d.%d.%d.%d" % (ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255)
        name = "svc-%05d" % i
        ops.append({"op": "apply", "resource": "services", "object": {
            "metadata": {"name": name, "namespace": "ns-%d" % (i % 100)},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]}}})
        eps = []
        for j in range(per_service):
            k = i * per_service + j
            eps.append({"addresses": ["10.200.%d.%d" % (k >> 8 & 255, k & 255)],
                        "conditions": {"ready": True},
                        "nodeName": "node-%d" % (k % 50), "zone": "z%d" % (k % 3)})
        ops.append({"op": "apply", "resource": "endpointslices", "object": {
            "metadata": {"name": name + "-abcde", "namespace": "ns-%d" % (i % 100),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": eps}})
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
    a = p.parse_args()

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
    control = "http://127.0.0.1:%d" % info["control"]

    def post(path, body):
        req = urllib.request.Request(control + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req) as r:
            r.read()

    health, metrics_port = free_port(), free_port()
    log = open(os.path.join(tmp, "ringvip.log"), "w")
    t0 = time.monotonic()
    rv = subprocess.Popen(
        [a.ringvip, "run", "--kube", "--kubeconfig", info["kubeconfig"], "--node-name", "node-a",
         "--no-tun", "--nodeport-addresses", "127.0.0.1/32", "--node-port-range", "1-65535",
         "--health-addr", "127.0.0.1:%d" % health, "--metrics-addr", "127.0.0.1:%d" % metrics_port],
        stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, RINGVIP_LOG="warn"))
    try:
        while who(node_port) != "a":
            if time.monotonic() - t0 > 120:
                sys.exit("not serving after 120 s; log in %s" % tmp)
            time.sleep(0.002)
        serving = time.monotonic() - t0
        time.sleep(1)
        rss_serving = proc_kib(rv.pid, "VmRSS")

        before = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port).read().decode()
        latencies = []
        target = "a"
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
        rss_end = proc_kib(rv.pid, "VmRSS")
        hwm = proc_kib(rv.pid, "VmHWM")
    finally:
        rv.terminate()
        rv.wait()
        fixture.kill()
        fixture.wait()

    latencies.sort()
    ms = lambda s: "%.1f ms" % (s * 1000)
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))]
    first_s = metric(before, "ringvip_sync_proxy_rules_duration_seconds_sum")
    first_n = metric(before, "ringvip_sync_proxy_rules_duration_seconds_count")
    # The syncs of the changes only (the initial full sync is reported apart).
    sync_n = metric(text, "ringvip_sync_proxy_rules_duration_seconds_count") - first_n
    sync_s = metric(text, "ringvip_sync_proxy_rules_duration_seconds_sum") - first_s
    np_n = metric(text, "ringvip_network_programming_duration_seconds_count")
    np_s = metric(text, "ringvip_network_programming_duration_seconds_sum")
    print("services %d, endpoints %d (+1 probe Service)" % (a.services, a.services * a.endpoints_per_service))
    print("start -> serving:            %.2f s" % serving)
    print("RSS serving / after changes: %.0f MiB / %.0f MiB (peak %.0f MiB)" % (
        rss_serving / 1024, rss_end / 1024, hwm / 1024))
    print("endpoint change -> new endpoint gets connections (%d changes): median %s, p90 %s, max %s" % (
        len(latencies), ms(statistics.median(latencies)), ms(q(0.9)), ms(latencies[-1])))
    if sync_n:
        print("ringvip sync duration (compile + publish): initial %s (%d syncs), then mean %s over %d syncs" % (
            ms(first_s), first_n, ms(sync_s / sync_n), sync_n))
    if np_n:
        print("ringvip network programming duration: mean %s over %d changes" % (ms(np_s / np_n), np_n))


if __name__ == "__main__":
    main()
