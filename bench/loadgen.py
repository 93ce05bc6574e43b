"""An asyncio + aiohttp load generator for `POST /predict`: one real JPEG per request, 127.0.0.1 only,
bounded by both a request count and a time limit.

The client shares the server's cores, so it is kept cheap: each image's multipart body is encoded once,
before measuring, and sent as bytes (the same bytes on the wire as a form upload), over aiohttp, which
costs a fraction of httpx's CPU per request (measured: httpx used 0.76 of the 2 cores at 64 clients).

Closed loop (`closed_loop`): N clients each send their next request as soon as the last one is answered;
this finds the throughput at a concurrency. Open loop (`open_loop`): requests start on a fixed schedule
whatever the server does, and latency counts from the scheduled start, so a server that falls behind is
charged for the queue it builds (no coordinated omission).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import aiohttp

from bench.common import percentile


@dataclass
class Level:
    mode: str  # "closed" or "open"
    concurrency: int | None = None
    rate: float | None = None  # requests/s offered (open loop)
    ok: int = 0
    errors: int = 0
    error_kinds: dict = field(default_factory=dict)
    seconds: float = 0.0
    warmup_ok: int = 0  # answered warm-up requests (not in the figures)
    latencies_ms: list = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        lat = self.latencies_ms
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update(requests=self.ok + self.errors, throughput=self.throughput, p50_ms=percentile(lat, 50),
                   p90_ms=percentile(lat, 90), p95_ms=percentile(lat, 95), p99_ms=percentile(lat, 99),
                   max_ms=max(lat) if lat else None)
        return out

    def record(self, started: float, outcome: str | None) -> None:
        if outcome is None:
            self.ok += 1
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            self.errors += 1
            self.error_kinds[outcome] = self.error_kinds.get(outcome, 0) + 1


def _check_local(url: str) -> None:
    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the load generator only targets 127.0.0.1, not {url}")


BOUNDARY = "refit-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def encode(images: list[tuple[str, bytes]]) -> list[bytes]:
    """Each (name, JPEG bytes) as the multipart body of `curl -F images=@name`."""
    return [(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
             'Content-Type: image/jpeg\r\n\r\n').encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
            for name, data in images]


async def _one(client: aiohttp.ClientSession, body: bytes) -> str | None:
    """Send one image; None when the answer is a one-item prediction list, else what went wrong."""
    try:
        async with client.post("/predict", data=body, headers={"Content-Type": CONTENT_TYPE}) as r:
            content = await r.read()
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return type(e).__name__
    if status != 200:
        return f"HTTP {status}"
    # A cheap check that keeps the client's CPU use (which competes with the server's) low.
    return None if content.startswith(b"[") and b'"version"' in content else "bad body"


def _client(url: str, connections: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def _closed(url: str, images: list, concurrency: int, seconds: float, max_requests: int,
                  timeout: float) -> Level:
    level = Level("closed", concurrency=concurrency)
    feed = itertools.cycle(encode(images))
    budget = itertools.count()
    async with _client(url, concurrency, timeout) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker():
            while time.perf_counter() < deadline and next(budget) < max_requests:
                t0 = time.perf_counter()
                level.record(t0, await _one(client, next(feed)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds = time.perf_counter() - start
    return level


async def _open(url: str, images: list, rate: float, seconds: float, max_requests: int, timeout: float,
                warmup_seconds: float = 0.0) -> Level:
    level = Level("open", rate=rate)
    feed = itertools.cycle(encode(images))
    n = max(1, min(max_requests, int(rate * seconds)))
    async with _client(url, 512, timeout) as client:

        async def schedule(count: int, record) -> None:
            start = time.perf_counter()

            async def request(i: int):
                scheduled = start + i / rate
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                outcome = await _one(client, next(feed))
                if record:
                    level.record(scheduled, outcome)

            await asyncio.gather(*(request(i) for i in range(count)))

        # The same rate on the same client first, unrecorded, as the closed-loop levels warm up: the
        # connections a steady client keeps open are made here, not inside the measured seconds.
        if warmup_seconds > 0:
            await schedule(max(1, int(rate * warmup_seconds)), record=False)
            level.warmup_ok = max(1, int(rate * warmup_seconds))  # every one is awaited before the level
        t0 = time.perf_counter()
        await schedule(n, record=True)
        level.seconds = time.perf_counter() - t0
    return level


def closed_loop(url: str, images: list, concurrency: int, *, seconds: float, warmup_seconds: float,
                max_requests: int, timeout: float = 120) -> dict:
    """Throughput and latency at a fixed number of clients, after a warm-up at the same concurrency."""
    _check_local(url)
    warmup = asyncio.run(_closed(url, images, concurrency, warmup_seconds, max_requests, timeout)).ok \
        if warmup_seconds > 0 else 0
    row = asyncio.run(_closed(url, images, concurrency, seconds, max_requests, timeout)).summary()
    return {**row, "generator": "aiohttp", "warmup_ok": warmup}


def open_loop(url: str, images: list, rate: float, *, seconds: float, max_requests: int,
              warmup_seconds: float = 0.0, timeout: float = 120) -> dict:
    """Latency at an offered request rate (requests start on a fixed schedule), after a warm-up at that rate."""
    _check_local(url)
    level = asyncio.run(_open(url, images, rate, seconds, max_requests, timeout, warmup_seconds))
    return {**level.summary(), "generator": "aiohttp", "warmup_ok": level.warmup_ok}
