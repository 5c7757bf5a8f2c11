#!/usr/bin/env python3
"""Scale benchmark of the manifest-file source (not a test): N ClusterIP
Services, each selecting its M Pods, in files of --per-file Services with
their Pods (the endpoints come from the selectors, as in file mode with
Pods); ringvip watches the directory. Measures

  * start -> first snapshot published (ringvip's log);
  * RSS once serving;
  * one Pod's readiness flipped in one file, --changes times (a change every
    --gap seconds; the file written to a temporary name and renamed into
    place): ringvip's network programming latency of each change from its
    debug log (from the file's first event, the temporary file's creation,
    to the snapshot published: the write, the source's wait for the write
    to settle and the parse of that one file are inside it), the control
    loop's part (since the source queued it), and how many files the reload
    parsed.

  cargo build --release && python3 benches/file_scale.py [--services 10000 --pods-per-service 10 --per-file 100]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cluster_ip(i):
    ip = 10 << 24 | 96 << 16 | (i + 10)  # inside 10.96.0.0/12
    return "%d.%d.%d.%d" % (ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255)


def documents(first, last, pods, not_ready=None):
    """The Services first..last-1 and their Pods; Pod `not_ready` (a global
    index) not ready."""
    out = []
    for i in range(first, last):
        out.append("apiVersion: v1\nkind: Service\nmetadata: {name: svc-%d, namespace: ns-%d}\n"
                   "spec:\n  clusterIP: %s\n  selector: {app: a%d}\n"
                   "  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n"
                   % (i, i % 100, cluster_ip(i), i))
        for j in range(pods):
            k = i * pods + j
            ready = "False" if k == not_ready else "True"
            out.append("apiVersion: v1\nkind: Pod\nmetadata: {name: p%d-%d, namespace: ns-%d, labels: {app: a%d}}\n"
                       "spec: {nodeName: node-%d}\nstatus:\n  podIP: 10.%d.%d.%d\n"
                       "  conditions: [{type: Ready, status: \"%s\"}]\n"
                       % (i, j, i % 100, i, k % 50, 200 + (k >> 16), k >> 8 & 255, k & 255, ready))
    return "---\n".join(out)


def write_file(d, f, per_file, services, pods, not_ready=None):
    path = os.path.join(d, "m%06d.yaml" % f)
    tmp = path + ".tmp"
    text = documents(f, min(services, f + per_file), pods, not_ready)
    with open(tmp, "w") as fh:
        fh.write(text)
    os.rename(tmp, path)  # as editors and config management do


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--pods-per-service", type=int, default=10)
    p.add_argument("--per-file", type=int, default=100, help="Services (with their Pods) per file")
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--gap", type=float, default=0.5, help="seconds between changes (beyond the debounce)")
    p.add_argument("--ringvip", default=os.path.join(ROOT, "target/release/ringvip"))
    a = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="ringvip-file-scale-")
    d = os.path.join(tmp, "manifests")
    os.makedirs(d)
    per = a.per_file
    for f in range(0, a.services, per):
        write_file(d, f, per, a.services, a.pods_per_service)
    log_path = os.path.join(tmp, "ringvip.log")
    log = open(log_path, "w")
    t0 = time.monotonic()
    rv = subprocess.Popen(
        [a.ringvip, "run", "--no-handover", "--manifests", d, "--node-name", "node-a", "--no-tun",
         "--health-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=log,
        env=dict(os.environ, RINGVIP_LOG="info,ringvip::programming=debug"))
    try:
        while "snapshot published" not in open(log_path).read():
            if time.monotonic() - t0 > 300 or rv.poll() is not None:
                sys.exit("not serving after 300 s; log in %s" % log_path)
            time.sleep(0.01)
        serving = time.monotonic() - t0
        time.sleep(1.5)  # the stamps of the files written above are trusted from now on
        with open("/proc/%d/status" % rv.pid) as f:
            rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        offset = os.path.getsize(log_path)
        for c in range(a.changes):
            # A Pod of a Service in the middle file flips readiness.
            svc = (a.services // 2 // per) * per + c % per
            pod = svc * a.pods_per_service if c % 2 == 0 else None
            write_file(d, svc // per * per, per, a.services, a.pods_per_service, pod)
            time.sleep(0.1 + a.gap)
        time.sleep(1)
    finally:
        rv.terminate()
        rv.wait()
    with open(log_path) as f:
        f.seek(offset)
        logged = f.read()
    lat = sorted(int(m.group(1)) / 1e3 for m in re.finditer(r"\blatency_us=(\d+)", logged))
    que = sorted(int(m.group(1)) / 1e3 for m in re.finditer(r"since_queued_us=(\d+)", logged))
    parsed = [int(m.group(1)) for m in re.finditer(r"files_parsed=(\d+)", logged)]
    q = lambda v, f: v[min(len(v) - 1, int(f * len(v)))]
    print("ringvip log: %s" % log_path)
    print("services %d, pods %d, files %d of %d Services each" % (
        a.services, a.services * a.pods_per_service, (a.services + per - 1) // per, per))
    print("start -> first snapshot published: %.2f s; RSS serving %.0f MiB" % (serving, rss / 1024))
    if lat:
        print("programming latency of %d changes (first file event -> published):"
              " median %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms" % (
                  len(lat), statistics.median(lat), q(lat, 0.9), q(lat, 0.99), lat[-1]))
        print("  of which since the source queued it: median %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms" % (
            statistics.median(que), q(que, 0.9), q(que, 0.99), que[-1]))
    print("files parsed per reload: %s" % (sorted(set(parsed)) or "none logged"))


if __name__ == "__main__":
    main()
