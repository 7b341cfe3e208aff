"""Measures the resident memory of a running `gateway` (scripts/memory): idle, with N streams open
at once, and after the clients left. Loopback only; every wait is bounded.

usage: measure.py GATEWAY_PID GATEWAY_PORT CLIENT_KEY STREAMS
Prints one `name value` line per figure (kB), which scripts/memory turns into a table.
"""
import asyncio
import os
import sys
import time
import urllib.request

PID, PORT, KEY, STREAMS = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
# Long enough (max_tokens x the region's token delay) to outlast opening every stream.
BODY = b'{"messages":[{"role":"user","content":"Tell me a long story"}],"max_tokens":600,"stream":true}'
REQUEST = (
    f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\napi-key: {KEY}\r\n"
    f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
).encode() + BODY
BOUND = 120  # seconds: no step may take longer


def status(field):
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/{PID}/status")


def in_flight():
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10).read().decode()
    return sum(
        float(l.rsplit(" ", 1)[1])
        for l in text.splitlines()
        if l.startswith("gateway_backend_in_flight{")
    )


def report(name, value):
    print(f"{name} {value}", flush=True)


async def stream(opened, release, failures):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            failures.append(head.split(b"\r\n", 1)[0].decode())
            opened()
            writer.close()
            return
        await reader.read(1)
        opened()

        async def drain():
            # A client that keeps reading, as SDKs do.
            while await reader.read(65536):
                pass

        reading = asyncio.ensure_future(drain())
        await release.wait()
        reading.cancel()
        writer.close()
    except Exception as e:  # noqa: BLE001 - any failure is reported, none is fatal
        failures.append(repr(e))
        opened()


async def main():
    report("idle_rss_kb", status("VmRSS"))
    release = asyncio.Event()
    failures = []
    count = 0
    all_open = asyncio.Event()

    def opened():
        nonlocal count
        count += 1
        if count == STREAMS:
            all_open.set()

    tasks = []
    for _ in range(STREAMS):
        tasks.append(asyncio.ensure_future(stream(opened, release, failures)))
        await asyncio.sleep(0)  # let connects spread a little
    started = time.monotonic()
    await asyncio.wait_for(all_open.wait(), BOUND)
    report("open_seconds", round(time.monotonic() - started, 1))
    report("streams_open", STREAMS - len(failures))
    if failures:
        report("stream_failures", len(failures))
        report("first_failure", failures[0].replace(" ", "_"))
    report("streams_rss_kb", status("VmRSS"))
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    deadline = time.monotonic() + BOUND
    while in_flight() > 0:
        if time.monotonic() > deadline:
            raise SystemExit("streams still in flight at the gateway")
        await asyncio.sleep(0.2)
    report("after_rss_kb", status("VmRSS"))
    # Let the allocator and tokio's idle timers settle, then look again.
    await asyncio.sleep(10)
    report("after_10s_rss_kb", status("VmRSS"))
    # MEMORY_LATE_SECONDS: look once more, e.g. after the upstream pool's idle connections (90 s) closed.
    late = int(os.environ.get("MEMORY_LATE_SECONDS", "0"))
    if late > 0:
        await asyncio.sleep(late)
        report(f"after_{10 + late}s_rss_kb", status("VmRSS"))
    report("peak_hwm_kb", status("VmHWM"))


asyncio.run(main())
