"""Soak test: vandamme against a fault-injecting fake OpenAI upstream, with clients that hang up at random.

    python bench/soak.py                         # 3000 requests or 120 s, whichever comes first
    python bench/soak.py --requests 500 --faults 0.5 --disconnects 0.2 --seed 7
    python bench/soak.py --proxy-cmd '{python} /path/proxy.py --port {port}' --proxy-env KEY=VAL

The upstream (bench/upstream.py --faults P) plans each request from the id hidden in its body: text, tool
calls, parallel tool calls or reasoning, and with probability P a fault (connection reset, 429/5xx, slow
first byte below or above the proxy's timeout, stream cut mid-way, garbage SSE lines, malformed JSON
chunks, in-band error, or a clean stream paced slowly enough to hang up in the middle of). Clients mix
streamed and JSON requests, and a share of them disconnect before the reply, after its headers, or mid-body.

Every completed response is checked:
  protocol  a JSON reply is an Anthropic message (200) or an Anthropic error {"type":"error","error":
            {"type","message"}} with a 4xx/5xx status; a stream is a grammatical Anthropic event stream
            (message_start first, blocks 0,1,2... strictly sequential, deltas typed per block, one
            message_delta with a stop_reason then message_stop and nothing after, or ended by an
            `event: error` frame; an event: line on every frame; never [DONE]);
  meaning   the reply matches what the upstream sent: a clean upstream reply must come back as a success
            with the same text and tool calls, a fault must not come back as a success.
Also: no request may hang, the proxy must survive, and its resident memory and open file descriptors must
grow less than 10% between the end of the warm-up and the end of the run.
Exit status: 0 if all hold, 1 otherwise (meaning mismatches only fail with --strict).
"""
import argparse
import asyncio
import json
import os
import random
import re
import resource
import shlex
import sys
import tempfile
import time

sys.dont_write_bytecode = True   # keep bench/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    HERE,
    Incomplete,
    Proc,
    check_error_body,
    check_message,
    check_stream,
    fixture,
    fold_system_messages,
    free_port,
    http_json,
    install_loop,
    open_fds,
    parse_sse,
    read_body,
    read_head,
    request_bytes,
    rss_bytes,
    tree,
    wait_port,
)
from upstream import expected, plan  # noqa: E402

MAIN = os.environ.get("VANDAMME_DIR", os.path.dirname(HERE))
SECRET = "sk-soak-secret-0123456789abcdef"      # the "echo" fault sends it back; no client may ever see it


class Soak:
    def __init__(self, a, port, log_dir):
        self.a, self.port = a, port
        body = fixture()
        if a.compat_body:
            body = fold_system_messages(body)
        first = body["messages"][0]
        content = first["content"]
        content = content if isinstance(content, list) else [{"type": "text", "text": content}]
        tagged = dict(first, content=[*content, {"type": "text", "text": "BENCHRID-@RID@-"}])
        body["messages"] = [tagged, *body["messages"][1:]]
        self.tpl = {s: json.dumps(dict(body, stream=s)).encode() for s in (False, True)}
        self.outcomes, self.violations, self.mismatches, self.cats = {}, 0, 0, {}
        self.log = open(os.path.join(log_dir, "problems.jsonl"), "w")  # noqa: SIM115 - closed by main()
        self.done = self.hangs = 0

    def note(self, key, n=1):
        self.outcomes[key] = self.outcomes.get(key, 0) + n

    def bad(self, kind, rid, streaming, what, raw=b""):
        """Record a problem, grouped by category; every instance goes to problems.jsonl."""
        cat = re.sub(r"^frame \d+ \([^)]*\): ", "", what).split(": expected")[0]
        cat = kind + ": " + re.sub(r"\d+", "N", cat)[:110]
        if kind == "violation":
            self.violations += 1
        else:
            self.mismatches += 1
        p = plan(rid, self.a.faults, streaming)
        case = f"rid={rid} {'stream' if streaming else 'json'} kind={p['kind']} fault={p['fault']}"
        entry = self.cats.setdefault(cat, [0, f"{case}: {what}" + (f"\n        body: {raw[:300]!r}" if raw else "")])
        entry[0] += 1
        self.log.write(json.dumps({"kind": kind, "case": case, "what": what,
                                   "body": raw.decode("utf-8", "replace")}) + "\n")

    def mode(self, rid):
        """(streaming, hang-up point or None) for request rid."""
        rnd = random.Random(rid * 7919 + self.a.seed)
        streaming = rnd.random() < 0.6
        if streaming and plan(rid, self.a.faults, True)["fault"] == "paced" and rnd.random() < 0.5:
            return streaming, "mid_body", rnd       # hang up while the stream is live
        return streaming, (rnd.choice(["before_headers", "after_headers", "mid_body"])
                           if rnd.random() < self.a.disconnects else None), rnd

    async def one(self, rid, conn):
        """One request; returns the connection to reuse or None."""
        streaming, hangup, rnd = self.mode(rid)
        body = self.tpl[streaming].replace(b"@RID@", str(rid).encode())
        req = request_bytes("POST", "/v1/messages", self.port, body)
        r, w = conn or await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22), 10)
        w.write(req)
        try:
            if hangup == "before_headers":
                await asyncio.sleep(rnd.uniform(0, 0.05))
                raise _HungUp
            try:
                line, headers = await read_head(r)
            except (Incomplete, ConnectionResetError) as e:
                if conn is None or "inside" in str(e):
                    raise
                w.transport.abort()     # the idle keep-alive connection was closed: retry once, fresh
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port, limit=1 << 22), 10)
                w.write(req)
                line, headers = await read_head(r)
            if hangup == "after_headers":
                raise _HungUp
            if hangup == "mid_body":
                try:
                    data = await asyncio.wait_for(read_body(r, headers), rnd.uniform(0, 0.3))
                except TimeoutError:
                    raise _HungUp from None
            else:
                data = await read_body(r, headers)
        except _HungUp:
            w.transport.abort()
            self.note(f"client hung up {hangup}")
            return None
        self.check(rid, streaming, int(line.split(" ", 2)[1]), headers, data)
        return None if headers.get("connection", "").lower() == "close" else (r, w)

    def check(self, rid, streaming, status, headers, data):
        if SECRET.encode() in data:
            self.bad("violation", rid, streaming, "the provider key reached the client", data)
        ctype = headers.get("content-type", "")
        p = plan(rid, self.a.faults, streaming)
        want = expected(p)
        summary = None
        if status == 200 and streaming and ctype.startswith("text/event-stream"):
            v, summary, errored = check_stream(data.decode("utf-8", "replace"))
            if v:      # later frames of a broken stream mostly repeat the first problem
                self.bad("violation", rid, streaming, v[0] + (f" (+{len(v) - 1} more)" if len(v) > 1 else ""), data)
            if errored:
                try:
                    etype = next(json.loads(d) for e, d in parse_sse(data.decode("utf-8", "replace"))
                                 if e == "error")["error"]["type"]
                except (ValueError, LookupError, TypeError, StopIteration):
                    etype = "?"
                self.note(f"stream event:error {etype}")
            elif summary:
                self.note("200 stream completed (message_stop)")
        elif status == 200:
            if streaming or not ctype.startswith("application/json"):
                self.bad("violation", rid, streaming, f"status 200 with content-type {ctype!r} for "
                         f"{'a streaming' if streaming else 'a JSON'} request", data)
                return
            try:
                v, summary = check_message(json.loads(data))
            except ValueError:
                v, summary = ["200 body is not JSON"], None
            if v:
                self.bad("violation", rid, streaming, "; ".join(v), data)
            if summary:
                self.note("200 JSON message")
        else:
            try:
                e = check_error_body(json.loads(data))
            except ValueError:
                e = "error body is not JSON"
            if e or status < 400:
                self.bad("violation", rid, streaming, f"HTTP {status}: {e or 'not an error status'}", data)
                return
            self.note(f"HTTP {status} {json.loads(data)['error']['type']}")
        if want == "error" and summary:
            self.bad("mismatch", rid, streaming, "upstream fault came back as a successful reply")
        elif want == "ok" and summary is None:
            self.bad("mismatch", rid, streaming, f"clean upstream reply came back as an error (HTTP {status})", data)
        elif summary:
            exp = {"text": "".join(p["text"]), "tools": [list(t) for t in p["tools"]],
                   "stop_reason": "tool_use" if p["tools"] else "end_turn"}
            got = dict(summary, tools=[list(t) for t in summary["tools"]])
            diff = [f"{k}: expected {exp[k]!r}, got {got[k]!r}" for k in exp if exp[k] != got[k]]
            if diff:
                self.bad("mismatch", rid, streaming, "; ".join(diff))

    async def worker(self, rids, deadline):
        conn = None
        while rids and time.monotonic() < deadline:
            rid = rids.pop()
            try:
                conn = await asyncio.wait_for(self.one(rid, conn), self.a.request_timeout)
            except TimeoutError:
                self.hangs += 1
                self.note("client timeout (hang)")
                self.bad("violation", rid, self.mode(rid)[0], f"no complete reply within {self.a.request_timeout}s")
                conn = self.close(conn)
            except (OSError, Incomplete, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.note(f"connection dropped by proxy ({type(e).__name__})")
                streaming = self.mode(rid)[0]
                if expected(plan(rid, self.a.faults, streaming)) == "ok":
                    self.bad("mismatch", rid, streaming, f"clean upstream reply but the proxy dropped the "
                             f"connection ({type(e).__name__}: {e})")
                conn = self.close(conn)
            self.done += 1

    @staticmethod
    def close(conn):
        if conn:
            conn[1].transport.abort()
        return None

    async def run(self, first, n, deadline):
        rids = list(range(first + n - 1, first - 1, -1))
        await asyncio.gather(*(self.worker(rids, deadline) for _ in range(self.a.concurrency)))


class _HungUp(Exception):
    pass


async def main(a, log_dir):
    up_port, port = free_port(), free_port()
    upstream = Proc("soak-upstream", [sys.executable, os.path.join(HERE, "upstream.py"), "--port", str(up_port),
                                      "--faults", str(a.faults), "--max-seconds", str(a.max_seconds + 120)],
                    None, None, log_dir)
    env = {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1", "LOG_LEVEL": "WARNING",
           "MAX_RETRIES": "1", "REQUEST_TIMEOUT": "5", "MAX_RESPONSE_BYTES": str(1 << 20)}
    sub = {"python": sys.executable, "port": port, "upstream_url": env["OPENAI_BASE_URL"],
           "upstream_base": f"http://127.0.0.1:{up_port}", "workdir": log_dir}
    for kv in a.proxy_env:
        k, _, v = kv.partition("=")
        env[k] = v.format(**sub)
    argv = [x.format(**sub) for x in shlex.split(a.proxy_cmd)]
    proxy = None
    failures = []
    try:
        wait_port(up_port, upstream)
        proxy = Proc("soak-proxy", argv, env, None, log_dir)
        wait_port(port, proxy, 60)
        print(f"proxy: {' '.join(argv)} (pid {proxy.pid}); env MAX_RETRIES={env['MAX_RETRIES']} "
              f"REQUEST_TIMEOUT={env['REQUEST_TIMEOUT']}; upstream faults {a.faults:.0%}, client hang-ups "
              f"{a.disconnects:.0%}, seed {a.seed}")
        t_start = time.monotonic()
        deadline = t_start + a.max_seconds
        s = Soak(a, port, log_dir)
        warm = max(100, a.requests // 5)      # RSS settles after a few hundred requests
        await s.run(1, warm, deadline)
        await settle(up_port)
        pids = tree(proxy.pid)
        rss0, fds0 = rss_bytes(pids), open_fds(pids)
        print(f"after warm-up ({warm} requests, {time.monotonic() - t_start:.1f}s): RSS {rss0 / 2**20:.1f} MB, "
              f"{fds0} fds", flush=True)
        trend, rest, first = [rss0], a.requests - warm, 1 + warm
        for part in range(4):                  # four quarters, RSS after each: a leak keeps climbing
            n = rest // 4 + (rest % 4 if part == 3 else 0)
            await s.run(first, n, deadline)
            first += n
            trend.append(rss_bytes(tree(proxy.pid)))
        elapsed = time.monotonic() - t_start
        quiet = await settle(up_port)
        alive = proxy.alive()
        pids = tree(proxy.pid)
        rss1, fds1 = rss_bytes(pids), open_fds(pids)
        try:
            health = (await http_json(port, "GET", "/health"))[0]
        except (TimeoutError, OSError, Incomplete) as e:
            health = type(e).__name__
        _, ust = await http_json(up_port, "GET", "/stats")

        print(f"\n{s.done} requests in {elapsed:.1f}s ({s.done / elapsed:.0f}/s), concurrency {a.concurrency}")
        print("upstream faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(ust["faults"].items())))
        print(f"upstream streams the proxy abandoned mid-way (its client had hung up): {ust['abandoned']}")
        print("outcomes seen by clients:")
        for k, v in sorted(s.outcomes.items(), key=lambda kv: -kv[1]):
            print(f"  {v:6d}  {k}")
        rss_g, fd_g = rss1 / rss0 - 1, (fds1 - fds0) / max(fds0, 1)
        print("proxy RSS after warm-up and each quarter: " + " ".join(f"{x / 2**20:.1f}" for x in trend) + " MB")
        print(f"proxy RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MB ({rss_g:+.1%}); open fds {fds0} -> {fds1} "
              f"({fd_g:+.1%}); upstream responses still in progress after settling: {quiet}; "
              f"GET /health -> {health}; proxy alive: {alive}")
        if s.cats:
            print(f"problems by category (count, first case; all in {log_dir}/problems.jsonl):")
            for cat, (n, ex) in sorted(s.cats.items(), key=lambda kv: -kv[1][0]):
                print(f"  {n:5d}  {cat}\n         e.g. {ex}")
        s.log.close()
        print(f"responses with protocol violations: {s.violations}   meaning mismatches: {s.mismatches}   "
              f"hangs: {s.hangs}")
        if s.violations:
            failures.append(f"{s.violations} protocol violations")
        if a.strict and s.mismatches:
            failures.append(f"{s.mismatches} meaning mismatches")
        if not alive or health != 200:
            failures.append(f"proxy not healthy at the end (alive={alive}, /health={health})")
        if rss_g >= 0.10:
            failures.append(f"RSS grew {rss_g:.1%}")
        if fd_g >= 0.10 and fds1 - fds0 > 4:
            failures.append(f"open fds grew {fd_g:.1%}")
        if not alive:
            print(proxy.tail())
    finally:
        if proxy:
            proxy.stop()
        upstream.stop()
    print("SOAK " + ("FAILED: " + "; ".join(failures) if failures else "PASSED") + f"   (logs: {log_dir})")
    return 1 if failures else 0


async def settle(up_port, limit=15.0):
    """Wait (bounded) until the upstream has no response in progress; returns how many remain."""
    t_end = time.monotonic() + limit
    while True:
        _, st = await http_json(up_port, "GET", "/stats")
        if st["active"] == 0 or time.monotonic() > t_end:
            await asyncio.sleep(0.5)
            return st["active"]
        await asyncio.sleep(0.25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--faults", type=float, default=0.35, help="share of requests the upstream spoils")
    ap.add_argument("--disconnects", type=float, default=0.1, help="share of clients that hang up early")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--request-timeout", type=float, default=30.0, help="client-side limit; beyond it = hang")
    ap.add_argument("--proxy-cmd",
                    default="{python} " + os.path.join(MAIN, "vandamme.py") + " --host 127.0.0.1 --port {port}")
    ap.add_argument("--proxy-env", action="append", default=[], help="KEY=VAL ({upstream_url} {port} allowed)")
    ap.add_argument("--compat-body", action="store_true", help="fold role:system messages into system (for peers)")
    ap.add_argument("--strict", action="store_true", help="also fail on meaning mismatches")
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"soak client loop: {install_loop()}")
    sys.exit(asyncio.run(main(args, tempfile.mkdtemp(prefix="vandamme-soak-"))))
