#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that puts a KMS D ms away: every chunk forwarded, in either
direction, is delivered D/2 ms after it arrived, so a request and its answer take one round trip
of D ms more than they would. Chunks are delayed, not serialised: a connection's later chunk
waits for its own deadline, not for the earlier chunk's pause on top, so the proxy adds latency
and never limits throughput.

usage: latency_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS
Prints "ready" on stdout once listening. SIGSTOP it to hang the KMS (connections and new
connects stall), SIGCONT to resume; kill it to refuse connections.
"""

import asyncio
import sys
import time


async def pipe(reader, writer, half_delay):
    """Copies reader to writer, each chunk delivered `half_delay` seconds after it arrived."""
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            pause = due - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            queue.put_nowait((time.monotonic() + half_delay, data))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    half = delay_ms / 2000.0

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w, half), pipe(server_r, client_w, half))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
