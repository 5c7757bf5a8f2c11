"""Load helper for benches/tun-memory.sh (stdlib only).

server HOST PORT          answer every line with "pong\\n", keep connections open
hold HOST PORT N          open N connections, one ping/pong each, hold them; print when done
rate HOST PORT N CONC     N short connections (connect, ping, pong, close), CONC at once; print conn/s
"""
import asyncio
import sys
import time


async def serve(host, port):
    async def handle(r, w):
        try:
            while await r.readline():
                w.write(b"pong\n")
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    srv = await asyncio.start_server(handle, host, int(port), backlog=4096)
    async with srv:
        await srv.serve_forever()


async def one(host, port, keep):
    r, w = await asyncio.open_connection(host, int(port))
    w.write(b"ping\n")
    await w.drain()
    assert await r.readline() == b"pong\n"
    if keep is None:
        w.close()
    else:
        keep.append(w)


async def hold(host, port, n):
    keep, sem = [], asyncio.Semaphore(200)

    async def go():
        async with sem:
            await one(host, port, keep)

    await asyncio.gather(*(go() for _ in range(int(n))))
    print(f"holding {len(keep)}", flush=True)
    await asyncio.sleep(3600)


async def rate(host, port, n, conc):
    sem = asyncio.Semaphore(int(conc))

    async def go():
        async with sem:
            await one(host, port, None)

    t = time.monotonic()
    await asyncio.gather(*(go() for _ in range(int(n))))
    print(f"{int(n) / (time.monotonic() - t):.0f}")


cmd, args = sys.argv[1], sys.argv[2:]
asyncio.run({"server": serve, "hold": hold, "rate": rate}[cmd](*args))
