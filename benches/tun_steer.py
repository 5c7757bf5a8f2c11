"""Helpers for benches/tun-handover.sh (stdlib only; `steer` needs root).

steer DEV QUEUE             make the kernel put every packet of TUN device DEV
                            on queue QUEUE: a two-instruction eBPF steering
                            program (TUNSETSTEERINGEBPF), set through a queue
                            attached for the purpose and detached again (the
                            last queue, so no other queue is renumbered)
pingpong HOST PORT SECS     one TCP connection to a tun_load.py server, opened
                            at once, then ping/pong round trips for SECS
                            seconds; prints "EPOCH COUNT" for every 0.5 s
"""
import ctypes
import fcntl
import os
import socket
import struct
import sys
import time

IFF_TUN, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR, IFF_DETACH_QUEUE = 0x1, 0x1000, 0x100, 0x4000, 0x400
TUNSETIFF = 0x400454CA
TUNSETQUEUE = 0x400454D9
TUNSETSTEERINGEBPF = 0x800454E0
SYS_BPF = 321  # x86_64
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1


def steer(dev, queue):
    libc = ctypes.CDLL(None, use_errno=True)
    # r0 = queue; exit (the kernel takes the result modulo the queue count).
    insns = struct.pack("<BBhi", 0xB7, 0, 0, int(queue)) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    ibuf = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack(
        "=IIQQIIQII16s", BPF_PROG_TYPE_SOCKET_FILTER, 2, ctypes.addressof(ibuf),
        ctypes.addressof(lic), 0, 0, 0, 0, 0, b"")
    abuf = ctypes.create_string_buffer(attr + b"\0" * (128 - len(attr)))
    libc.syscall.restype = ctypes.c_long
    prog = libc.syscall(SYS_BPF, BPF_PROG_LOAD, abuf, 128)
    if prog < 0:
        sys.exit(f"bpf: {os.strerror(ctypes.get_errno())}")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    # The device's own flags: other ones would change them for every queue.
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", dev.encode(), flags))
    fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_DETACH_QUEUE))
    os.close(fd)
    print(f"steering every packet of {dev} to queue {queue}")


def pingpong(host, port, secs):
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    end = time.time() + float(secs)
    tick, n = time.time() + 0.5, 0
    while time.time() < end:
        s.sendall(b"ping\n")
        if f.readline() != b"pong\n":
            sys.exit("bad answer")
        n += 1
        if time.time() >= tick:
            print(f"{time.time():.3f} {n}", flush=True)
            tick, n = tick + 0.5, 0


if __name__ == "__main__":
    {"steer": steer, "pingpong": pingpong}[sys.argv[1]](*sys.argv[2:])
