#!/usr/bin/env python3
"""The kernel's own race at a listener's close, without ringvip.

Two SO_REUSEPORT listeners on one loopback port are opened, kept for 1-10 ms
and shut down, over and over, while three clients connect with a 1 s timeout.
A SYN looked up on a listener just as another CPU closes it is dropped
without a reset (the socket is in TCP_CLOSE by the time the SYN is handled),
so its client waits for the kernel's retransmission 1 s later. Any server
that closes a listening socket under load shows it; the count of connects
that timed out is printed.

    python3 benches/listener_close_race.py [SECONDS]
"""
import random
import socket
import sys
import threading
import time


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    stop = threading.Event()
    counts = {"connected": 0, "refused": 0, "timed out (SYN dropped)": 0, "other": 0}
    closes = [0]
    lock = threading.Lock()

    def churn():
        while not stop.is_set():
            socks = []
            for _ in range(2):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(("127.0.0.1", port))
                s.listen(4096)
                s.setblocking(False)
                socks.append(s)
            until = time.monotonic() + random.uniform(0.001, 0.01)
            while time.monotonic() < until:
                for s in socks:
                    try:
                        while True:
                            c, _ = s.accept()
                            c.close()
                    except BlockingIOError:
                        pass
            for s in socks:
                s.shutdown(socket.SHUT_RD)
                s.close()
                closes[0] += 1
            time.sleep(random.uniform(0.0005, 0.005))

    def client():
        while not stop.is_set():
            c = socket.socket()
            c.settimeout(1.0)
            try:
                c.connect(("127.0.0.1", port))
                k = "connected"
            except ConnectionRefusedError:
                k = "refused"
            except socket.timeout:
                k = "timed out (SYN dropped)"
            except OSError:
                k = "other"
            c.close()
            with lock:
                counts[k] += 1

    threads = [threading.Thread(target=churn)] + [
        threading.Thread(target=client) for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    print(f"{closes[0]} listener closes in {seconds:.0f} s; connects: {counts}")


if __name__ == "__main__":
    main()
