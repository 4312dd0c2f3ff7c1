"""Closed-loop load generator: C keep-alive connections each send a Claude-Code-sized POST /v1/messages
(the fixture messages_basic_sonnet.json, "stream" set per mode) back to back, bounded by a request count
and a duration, and validate every response (JSON: type=="message"; SSE: message_start first,
message_stop last, an event: line on every frame, no [DONE]).

Used by run.py in-process; standalone:
  python bench/loadgen.py --port 8082 --mode s --concurrency 16 --duration 5
"""
import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

sys.dont_write_bytecode = True   # keep bench/ free of __pycache__
sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    Incomplete,
    fixture,
    fold_system_messages,
    install_loop,
    quick_check,
    read_body,
    read_head,
    request_bytes,
)

perf = time.perf_counter


def body_for(streaming, compat=False, name="messages_basic_sonnet.json"):
    body = fixture(name)
    return json.dumps(dict(fold_system_messages(body) if compat else body, stream=streaming)).encode()


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Point:
    """One closed-loop run against one port."""

    def __init__(self, port, streaming, concurrency, compat=False, path="/v1/messages"):
        self.req = request_bytes("POST", path, port, body_for(streaming, compat))
        self.port, self.streaming, self.concurrency = port, streaming, concurrency
        self.measuring = self.stopping = False
        self.lat, self.ttfb, self.errors = [], [], {}
        self.done = asyncio.Event()
        self.max_requests = 0

    async def worker(self):
        r = w = None
        backoff = 0.01
        while not self.stopping:
            first = []
            t0 = perf()
            try:
                if w is None:
                    r, w = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22)
                    t0 = perf()
                w.write(self.req)
                line, headers = await read_head(r)
                status = int(line.split(" ", 2)[1])
                body = await read_body(r, headers, lambda first=first: first.append(perf()))
                err = quick_check(self.streaming, status, body)
                if headers.get("connection", "").lower() == "close":
                    w.close()
                    w = None
                backoff = 0.01
            except (OSError, Incomplete, asyncio.LimitOverrunError, ValueError, IndexError) as e:
                err = type(e).__name__
                if w is not None:
                    w.close()
                w = None
                await asyncio.sleep(backoff)           # a dead target must not become a hot loop
                backoff = min(backoff * 2, 0.5)
            if not self.measuring:
                continue
            if err:
                self.errors[err] = self.errors.get(err, 0) + 1
            else:
                t1 = perf()
                self.lat.append(t1 - t0)
                self.ttfb.append((first[0] if first else t1) - t0)
                if self.max_requests and len(self.lat) >= self.max_requests:
                    self.done.set()
        if w is not None:
            w.close()

    async def run(self, duration, max_requests=0, warmup=1.0, on_start=None, on_end=None, sample=None,
                  grace=10.0):
        """Warm up, then measure for `duration` s or `max_requests` good responses; returns figures."""
        self.max_requests = max_requests
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.sleep(warmup)
            if on_start:
                on_start()
            self.measuring = True
            t0 = perf()
            while not self.done.is_set() and perf() - t0 < duration:
                if sample:
                    sample()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.done.wait(), min(0.1, max(0.0, duration - (perf() - t0))))
            self.measuring = False
            window = perf() - t0
            if on_end:
                on_end()
            self.stopping = True
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:      # requests still open `grace` s after the window: count them, they never finished
                self.errors["unfinished"] = len(pending)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        n = len(self.lat)
        return {"requests": n, "errors": self.errors, "window_s": window, "rps": n / window if window else 0,
                "p50_ms": ms(pct(self.lat, 0.5)), "p99_ms": ms(pct(self.lat, 0.99)),
                "ttfb_p50_ms": ms(pct(self.ttfb, 0.5)), "ttfb_p99_ms": ms(pct(self.ttfb, 0.99))}


def ms(x):
    return None if x is None else round(x * 1000, 3)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["s", "ns"], default="ns")
    ap.add_argument("--concurrency", "-c", type=int, default=16)
    ap.add_argument("--duration", "-d", type=float, default=5.0)
    ap.add_argument("--requests", "-n", type=int, default=100000)
    a = ap.parse_args()
    print(f"loadgen loop: {install_loop()}", file=sys.stderr)
    res = asyncio.run(Point(a.port, a.mode == "s", a.concurrency).run(a.duration, a.requests))
    print(json.dumps(res))
