#!/usr/bin/env python3
"""Start-up A/B of the API source (not a test): one fixture API server
(integration/support/kube_fixture.py) preloaded with N Services x 10
endpoints, as benches/kube_scale.py builds them, and ringvip started against
it again and again, alternating the binaries given, ROUNDS times. Each start
prints start -> serving (the first answer through the probe NodePort), the
CPU time ringvip and the fixture used until then, RSS, and the times of
ringvip's `listed` / `initial list complete` / first `snapshot published`
log lines (seconds within the minute), so builds are compared in one
sitting on the same fixture without re-generating it for every run.

  python3 benches/kube_start.py --services 100000 --rounds 2 target/ringvip-a target/ringvip-b

A binary may be a wrapper script (an environment, perf record around it).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kube_scale as ks  # noqa: E402  (the fixture's objects and helpers)


def start(binary, info, node_port, fixture_pid, tmp):
    health, metrics = ks.free_port(), ks.free_port()
    log = open(os.path.join(tmp, "ringvip.log"), "w")
    fixture_cpu0 = ks.cpu_seconds(fixture_pid)
    t0 = time.monotonic()
    rv = subprocess.Popen(
        [binary, "run", "--no-handover", "--kube", "--kubeconfig", info["kubeconfig"], "--node-name", "node-a",
         "--no-tun", "--nodeport-addresses", "127.0.0.1/32", "--node-port-range", "1-65535",
         "--health-addr", "127.0.0.1:%d" % health, "--metrics-addr", "127.0.0.1:%d" % metrics],
        stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, RINGVIP_LOG="info"))
    try:
        while ks.who(node_port) != "a":
            if time.monotonic() - t0 > 120:
                sys.exit("not serving after 120 s; log in %s" % log.name)
            time.sleep(0.002)
        serving = time.monotonic() - t0
        cpu, fixture_cpu = ks.cpu_seconds(rv.pid), ks.cpu_seconds(fixture_pid) - fixture_cpu0
        rss = ks.proc_kib(rv.pid, "VmRSS") / 1024
    finally:
        rv.terminate()
        rv.wait()
    text = open(log.name).read()

    def at(pattern):
        m = re.search(r"^\S+T\d\d:\d\d:(\S+)Z .*" + pattern, text, re.M)
        return m.group(1) if m else "-"

    print("%-28s serving %5.2f s  CPU ringvip %5.2f s fixture %4.2f s  RSS %4.0f MiB  "
          "listed Service %s EndpointSlice %s, complete %s, published %s  load %.2f" % (
              os.path.basename(binary), serving, cpu, fixture_cpu, rss, at('listed kind="Service"'),
              at('listed kind="EndpointSlice"'), at("initial list complete"), at("snapshot published"),
              os.getloadavg()[0]), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=100000)
    p.add_argument("--endpoints-per-service", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("binaries", nargs="+")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="ringvip-kube-start-")
    port_a, port_b = ks.backend("a"), ks.backend("b")
    node_port = ks.free_port()
    load = os.path.join(tmp, "preload.json")
    with open(load, "w") as f:
        json.dump(ks.generate(a.services, a.endpoints_per_service, node_port, port_a, port_b), f)
    fixture = subprocess.Popen(
        [sys.executable, os.path.join(ks.ROOT, "integration/support/kube_fixture.py"), "--dir", tmp,
         "--load", load, "--stdin", "--bookmark-interval", "5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(fixture.stdout.readline())
        for _ in range(a.rounds):
            for b in a.binaries:
                start(b, info, node_port, fixture.pid, tmp)
    finally:
        fixture.kill()
        fixture.wait()


if __name__ == "__main__":
    main()
