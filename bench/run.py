"""Benchmark vandamme against a byte relay (and optional peers) on loopback.

    python bench/run.py                                   # ns+s at concurrency 1,16,64,256, 5 s each
    python bench/run.py --points "ns:16 s:16" --duration 3 --json /tmp/bench.json
    python bench/run.py --peer 'vdm209={cache}/vdm209/bin/vdm server start --host 127.0.0.1 --port {port}' \\
        --peer-env vdm209:OPENAI_API_KEY=x --peer-env 'vdm209:OPENAI_BASE_URL={upstream_url}' ...
    python bench/run.py --peer vandamme-2.0.9             # preset (pip install vandamme-proxy==2.0.9 into
                                                          # the venv /tmp/peers/vdm209 first)
    python bench/run.py --streams-memory 2000             # RSS with N slow streams open at once

Starts the fake upstream (bench/upstream.py), the byte relay (bench/relay.py), vandamme
(/work/main/vandamme.py) and peers, one target at a time, and drives each with the closed-loop load
generator (bench/loadgen.py, in this process). With taskset available the target runs on CPU 1 and the
upstream and load generator on CPU 0. Per point it reports requests/s, p50/p99 latency, time to first
byte, the target's CPU milliseconds per request and peak resident memory (its whole process tree, read
from /proc), and each figure's ratio to the byte relay measured in the same run. "cpu0%" is the load
generator plus upstream: near 100% means the client side, not the target, limited the rate; "other%" is
CPU used by processes outside the benchmark (points above --max-foreign are re-run). Finally it times
vandamme's request conversion in-process on the largest Claude Code fixture.
"""
import argparse
import asyncio
import glob
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True   # keep bench/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    FIXTURES,
    HAVE_TASKSET,
    HERE,
    TICK,
    Incomplete,
    Proc,
    cpu_seconds,
    free_port,
    http_json,
    hwm_bytes,
    install_loop,
    open_fds,
    quick_check,
    read_body,
    read_head,
    request_bytes,
    rss_bytes,
    tree,
    wait_port,
)
from loadgen import Point, body_for  # noqa: E402

MAIN = os.environ.get("VANDAMME_DIR", os.path.dirname(HERE))
PRESETS = {   # launch facts for known peers (see /work/shared/bench/targets.json)
    "vandamme-2.0.9": ("/tmp/peers/vdm209/bin/vdm server start --host 127.0.0.1 --port {port}",
                       {"OPENAI_API_KEY": "dummy", "OPENAI_BASE_URL": "{upstream_url}",
                        "VDM_DEFAULT_PROVIDER": "openai", "HOST": "127.0.0.1", "PORT": "{port}",
                        "CACHE_DIR": "{workdir}/cache", "VDM_STRICT_PROFILE_VALIDATION": "false",
                        "LOG_LEVEL": "WARNING"}),
}
COLS = [("req/s", "rps", "{:.0f}"), ("p50 ms", "p50_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"),
        ("ttfb ms", "ttfb_p50_ms", "{:.2f}"), ("cpu ms/req", "cpu_ms_per_req", "{:.3f}"),
        ("peak MB", "peak_rss_mb", "{:.1f}")]


def proc_stat_busy():
    """CPU seconds spent in user+nice+system by every process (irq/softirq/steal excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:4]]
    return sum(v) / TICK


def targets(a, workdir):
    """Targets to measure; the upstream placeholders are filled in when an upstream is running."""
    sub = {"python": sys.executable, "workdir": workdir, "cache": "/tmp/peers", "bench": HERE}
    relay = "{python} " + os.path.join(HERE, "relay.py") + " --port {port} --upstream {upstream_base}"
    out = [{"name": "relay", "cmd": relay, "env": {}}]
    vd = os.path.join(MAIN, "vandamme.py")
    if not a.no_vandamme and os.path.exists(vd):
        cmd = "{python} " + vd + " --host 127.0.0.1 --port {port}" + (f" --workers {a.workers}" if a.workers else "")
        env = {"OPENAI_API_KEY": "x", "OPENAI_BASE_URL": "{upstream_url}", "LOG_LEVEL": "WARNING"}
        env.update(kv.split("=", 1) for kv in a.proxy_env)
        out.append({"name": "vandamme", "cmd": cmd, "env": env, "workers": a.workers})
        if not a.no_responses:     # the same gateway with the provider on the Responses API
            out.append({"name": "vandamme-responses", "cmd": cmd, "env": {**env, "OPENAI_API_FORMAT": "responses"},
                        "workers": a.workers})
    elif not a.no_vandamme:
        print(f"note: {vd} not found, measuring the relay and peers only")
    for spec in a.peer:
        name, _, cmd = spec.partition("=")
        if not cmd:
            if name not in PRESETS:
                sys.exit(f"--peer {name}: give NAME=CMD, or one of the presets {list(PRESETS)}")
            cmd, env = PRESETS[name]
        else:
            env = {}
        env = dict(env)
        for e in a.peer_env:
            pname, _, kv = e.partition(":")
            if pname == name:
                k, _, v = kv.partition("=")
                env[k] = v
        out.append({"name": name, "cmd": cmd, "env": env})
    for t in out:
        t["sub"] = sub
    return out


def launch(t, port, cpus, log_dir):
    sub = dict(t["sub"], port=port)
    argv = [x.format(**sub) for x in shlex.split(t["cmd"])]
    env = {k: v.format(**sub) for k, v in t["env"].items()}
    p = Proc(t["name"], argv, env, cpus, log_dir)
    wait_port(port, p, 60)
    return p


async def smoke(port, compat=False, modes=(False, True)):
    """One validated request per mode (streaming False/True); returns a list of problems."""
    bad = []
    for streaming in modes:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(request_bytes("POST", "/v1/messages", port, body_for(streaming, compat), ("Connection: close",)))
            line, h = await asyncio.wait_for(read_head(r), 30)
            body = await asyncio.wait_for(read_body(r, h), 30)
            w.close()
            err = quick_check(streaming, int(line.split()[1]), body)
            if err:
                bad.append(f"{'s' if streaming else 'ns'}: {err}: {body[:300]!r}")
        except (TimeoutError, OSError, Incomplete) as e:
            bad.append(f"{'s' if streaming else 'ns'}: {type(e).__name__} {e}")
    return bad


async def measure(a, proc, upstream, mode, conc):
    pids = tree(proc.pid)
    me = os.getpid()
    snap = {}
    peak = [rss_bytes(pids)]

    def take(key):
        snap[key] = (time.perf_counter(), cpu_seconds(pids), cpu_seconds([upstream.pid]), cpu_seconds([me]),
                     proc_stat_busy())

    def sample():
        peak[0] = max(peak[0], rss_bytes(pids))
    point = Point(proc.port, mode == "s", conc, proc.compat)
    res = await point.run(a.duration, a.requests, a.warmup, lambda: take(0), lambda: take(1), sample)
    (t0, p0, u0, m0, b0), (t1, p1, u1, m1, b1) = snap[0], snap[1]
    wall = t1 - t0
    res.update(mode=mode, conc=conc, proxy_cpu_pct=100 * (p1 - p0) / wall,
               cpu_ms_per_req=1000 * (p1 - p0) / res["requests"] if res["requests"] else None,
               peak_rss_mb=peak[0] / 2**20, cpu0_pct=100 * ((u1 - u0) + (m1 - m0)) / wall,
               other_pct=max(0.0, 100 * ((b1 - b0) - (p1 - p0) - (u1 - u0) - (m1 - m0)) / wall))
    return res


async def run_matrix(a, tlist, points, log_dir):
    """Each point gets a freshly started target, so its peak RSS belongs to that point alone."""
    results = []
    up_port = free_port()
    upstream = Proc("upstream", [sys.executable, os.path.join(HERE, "upstream.py"), "--port", str(up_port),
                                 "--chunks", str(a.chunks), "--delay-ms", str(a.delay_ms)], None, "0", log_dir)
    try:
        wait_port(up_port, upstream)
        for t in tlist:
            t["sub"]["upstream_url"] = f"http://127.0.0.1:{up_port}/v1"
            t["sub"]["upstream_base"] = f"http://127.0.0.1:{up_port}"
            cpus = None if t.get("workers", 0) and t["workers"] > 1 else "1"
            compat = None
            for mode, conc in points:
                res = None
                for attempt in range(a.retries + 1):
                    port = free_port()
                    try:
                        proc = launch(t, port, cpus, log_dir)
                    except RuntimeError as e:
                        print(f"[{t['name']}] failed to start: {e}")
                        res = None
                        break
                    proc.port = port
                    try:
                        await asyncio.sleep(0.5)
                        if compat is None:
                            compat = await first_contact(t, proc, cpus)
                        proc.compat = compat
                        res = await measure(a, proc, upstream, mode, conc)
                        res["peak_rss_mb"] = max(res["peak_rss_mb"], hwm_bytes(tree(proc.pid)) / 2**20)
                        if not proc.alive():
                            print(f"[{t['name']}] died:\n{proc.tail()}")
                    finally:
                        proc.stop()
                    if res["other_pct"] <= a.max_foreign or attempt == a.retries:
                        break
                    print(f"  re-running {mode}:{conc}: other processes took {res['other_pct']:.0f}% of a core")
                if res is None:
                    continue
                res["target"] = t["name"]
                results.append(res)
                print("  " + row(res, None), flush=True)
    finally:
        upstream.stop()
    return results


async def first_contact(t, proc, cpus):
    """Smoke-test a target; returns whether it needs the body with role:system messages folded."""
    bad, compat = await smoke(proc.port), False
    if bad and t["name"] not in ("relay", "vandamme") and not await smoke(proc.port, True):
        print(f"[{t['name']}] rejects the raw fixture ({bad[0][:160]}); it gets the body with its "
              "role:system message folded into `system`")
        bad, compat = [], True
    print(f"[{t['name']}] on CPU {cpus or 'any'}; smoke test: {bad or 'ok'}")
    return compat


def fmt(res, key, f, base):
    v = res.get(key)
    if v is None:
        return "-"
    s = f.format(v)
    if base is not None and base.get(key):
        s += f" ({v / base[key]:.2f}x)"
    return s


def row(res, base):
    err = sum(res["errors"].values())
    cells = [f"{res['target']:<14}", f"{res['mode']:>2}", f"{res['conc']:>4}"]
    cells += [f"{fmt(res, k, f, base):>16}" for _, k, f in COLS]
    cells += [f"{err:>5}", f"{res['cpu0_pct']:>5.0f}", f"{res['other_pct']:>6.0f}"]
    return " ".join(cells)


def report(results, a):
    base = {(r["mode"], r["conc"]): r for r in results if r["target"] == "relay"}
    head = f"{'target':<14} {'md':>2} {'conc':>4} " + " ".join(f"{c:>16}" for c, _, _ in COLS) + \
        f" {'err':>5} {'cpu0%':>5} {'other%':>6}"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r["mode"] != "ns", r["conc"], r["target"] != "relay")):
        lines.append(row(r, None if r["target"] == "relay" else base.get((r["mode"], r["conc"]))))
    print("\n" + "\n".join(lines))
    print("(x) = ratio to the byte relay at the same point; cpu ms/req and peak MB are the target's process tree")
    md = ["", "```", "python bench/" + shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "```", ""]
    md.append("| target | mode | conc | req/s | p50 ms | p99 ms | TTFB ms | CPU ms/req | peak RSS MB |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["target"] != "relay", r["target"], r["mode"] != "ns", r["conc"])):
        b = None if r["target"] == "relay" else base.get((r["mode"], r["conc"]))
        md.append(f"| {r['target']} | {'stream' if r['mode'] == 's' else 'json'} | {r['conc']} | " +
                  " | ".join(fmt(r, k, f, b) for _, k, f in COLS) + " |")
    pin = ("target pinned to CPU 1, upstream + load generator on CPU 0" if HAVE_TASKSET and not a.workers > 1
           else "no CPU pinning for the target")
    md.append(f"\nLoopback, 2 cores, {pin}; "
              f"{a.chunks}-chunk streams; ratios (x) are against a byte-relay aiohttp hop in the same run.")
    print("\n--- markdown ---" + "\n".join(md))
    return "\n".join(lines), "\n".join(md)


# ---------------------------------------------------------------- many slow streams at once

async def streams_memory(a, t, log_dir):
    n = a.streams_memory
    up_port, port = free_port(), free_port()
    upstream = Proc("slow-upstream", [sys.executable, os.path.join(HERE, "upstream.py"), "--port", str(up_port),
                                      "--chunks", "600", "--delay-ms", "1000"], None, "0", log_dir)
    proc = None
    opened, failed = [0], {}
    stop = asyncio.Event()
    try:
        wait_port(up_port, upstream)
        t["sub"].update(upstream_url=f"http://127.0.0.1:{up_port}/v1", upstream_base=f"http://127.0.0.1:{up_port}")
        proc = launch(t, port, "1", log_dir)
        await asyncio.sleep(1.0)
        compat = False
        bad = await smoke(port, modes=(False,))
        if bad and t["name"] not in ("relay", "vandamme") and not await smoke(port, True, (False,)):
            compat, bad = True, []
        if bad:
            print(f"[{t['name']}] smoke test failed: {bad}")
        pids = tree(proc.pid)
        idle_rss, idle_fds = rss_bytes(pids), open_fds(pids)
        req = request_bytes("POST", "/v1/messages", port, body_for(True, compat))
        gate = asyncio.Semaphore(128)

        async def one():
            w = None
            wait = min(60.0, a.open_timeout)
            try:
                async with gate:
                    if stop.is_set():
                        return
                    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                    w.write(req)
                    await asyncio.wait_for(read_head(r), wait)
                    seen = b""
                    while b"message_start" not in seen:
                        data = await asyncio.wait_for(r.read(65536), wait)
                        if not data:
                            raise Incomplete("closed before message_start")
                        seen += data
                opened[0] += 1
                while await r.read(65536):       # hold the stream open, reading, until cancelled
                    pass
            except (TimeoutError, OSError, Incomplete) as e:
                failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
            finally:
                if w is not None:
                    w.transport.abort()

        t0 = time.monotonic()
        tasks = [asyncio.create_task(one()) for _ in range(n)]
        while opened[0] + sum(failed.values()) < n and time.monotonic() - t0 < a.open_timeout:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        open_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        pids = tree(proc.pid)
        full_rss, full_fds = rss_bytes(pids), open_fds(pids)
        _, st = await http_json(up_port, "GET", "/stats")
        up_active, up_requests = st.get("active"), st.get("requests")
        n_open, n_failed = opened[0], dict(failed)
        stop.set()
        for x in tasks:                      # every client hangs up
            x.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(5.0)     # upstream chunks come every 1 s: a proxy that notices has closed by now
        after_rss, after_fds = rss_bytes(pids), open_fds(pids)
        _, st = await http_json(up_port, "GET", "/stats")
        up_after = st.get("active")
        res = {"target": t["name"], "streams": n, "opened": n_open, "failed": n_failed, "open_s": open_s,
               "idle_rss_mb": idle_rss / 2**20, "rss_mb": full_rss / 2**20,
               "kb_per_stream": (full_rss - idle_rss) / 1024 / max(1, n_open), "idle_fds": idle_fds,
               "fds": full_fds, "upstream_active": up_active, "after_close_rss_mb": after_rss / 2**20,
               "after_close_fds": after_fds, "upstream_active_5s_after_close": up_after,
               "alive": proc.alive()}
        print(f"[{t['name']}] {n_open}/{n} streams open after {open_s:.1f}s (failed {n_failed}): "
              f"RSS {idle_rss / 2**20:.1f} -> {full_rss / 2**20:.1f} MB "
              f"({res['kb_per_stream']:.1f} KB/stream), fds {idle_fds} -> {full_fds}, upstream streams {up_active} "
              f"(requests so far {up_requests}); "
              f"5 s after clients closed: RSS {after_rss / 2**20:.1f} MB, fds {after_fds}, "
              f"upstream streams still running {up_after}", flush=True)
        return res
    finally:
        stop.set()
        if proc:
            proc.stop()
        upstream.stop()


# ---------------------------------------------------------------- conversion micro-benchmark

def convert_bench(max_s=3.0, max_n=3000):
    """Median time of vandamme's Anthropic->OpenAI request conversion on the largest fixture
    (anthropic_to_openai(body, provider, model) with the provider that `model` resolves to), plus the
    other per-request steps of a streamed request: the input-token estimate and json.dumps of the payload."""
    path = max(glob.glob(os.path.join(FIXTURES, "messages_*.json")), key=os.path.getsize)
    env = {"OPENAI_API_KEY": "x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "LOG_LEVEL": "WARNING",
           "HOME": tempfile.mkdtemp()}
    sys.path.insert(0, MAIN)
    try:
        import vandamme as v
        with open(path, "rb") as f:
            raw = f.read()
        body = json.loads(raw)
        config = v.load_config(env, cwd=env["HOME"], home=env["HOME"])
        target = v.resolve_model(config, body["model"]).targets[0]
        provider = config.provider(target.provider)
        payload, conv = v.anthropic_to_openai(body, provider, target.model)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e} (adapt convert_bench() in bench/run.py)"}

    def timed(fn):
        fn()
        times, t_end = [], time.perf_counter() + max_s
        while len(times) < max_n and time.perf_counter() < t_end:
            t0 = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - t0)
        return statistics.median(times) / 1000, sorted(times)[int(0.99 * (len(times) - 1))] / 1000, len(times)
    med, p99, n = timed(lambda: v.anthropic_to_openai(body, provider, target.model))
    out = {"function": "vandamme.anthropic_to_openai", "fixture": os.path.basename(path), "bytes": len(raw),
           "iterations": n, "median_us": med, "p99_us": p99,
           "json_loads_us": timed(lambda: json.loads(raw))[0],
           "json_dumps_payload_us": timed(lambda: json.dumps(payload, separators=(",", ":")))[0]}
    if hasattr(v, "count_payload_tokens"):
        out["count_payload_tokens_us"] = timed(lambda: v.count_payload_tokens(payload, conv))[0]
    return out


# ---------------------------------------------------------------- main

def parse_points(s):
    out = []
    for part in s.replace(",", " ").split():
        if ":" in part:
            mode, c = part.split(":")
            out.append([mode, int(c)])
        else:
            out[-1].append(int(part))
    pts = []
    for item in out:
        if item[0] not in ("s", "ns"):
            sys.exit(f"bad point {item}: mode is s or ns")
        pts += [(item[0], c) for c in item[1:]]
    return pts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="ns:1,16,64,256 s:1,16,64,256", help='e.g. "ns:1,16 s:64"')
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    ap.add_argument("--requests", type=int, default=200000, help="max measured requests per point")
    ap.add_argument("--chunks", type=int, default=50, help="content chunks per upstream stream")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="pause between upstream stream chunks")
    ap.add_argument("--peer", action="append", default=[],
                    help="NAME=CMD ({port} {upstream_url} {python}), or a preset name")
    ap.add_argument("--peer-env", action="append", default=[], help="NAME:KEY=VAL for a peer's environment")
    ap.add_argument("--workers", type=int, default=0, help="pass --workers N to vandamme")
    ap.add_argument("--proxy-env", action="append", default=[], metavar="KEY=VAL",
                    help="extra environment for vandamme (e.g. POOL_LIMIT=4096)")
    ap.add_argument("--no-vandamme", action="store_true", help="skip vandamme (relay and peers only)")
    ap.add_argument("--no-convert", action="store_true", help="skip the conversion micro-benchmark")
    ap.add_argument("--no-responses", action="store_true", help="skip vandamme with a Responses API provider")
    ap.add_argument("--streams-memory", type=int, nargs="?", const=2000, default=0, metavar="N",
                    help="instead of the matrix: RSS with N (2000) slow streams open at once")
    ap.add_argument("--open-timeout", type=float, default=90.0, help="max seconds to open the N streams")
    ap.add_argument("--max-foreign", type=float, default=25.0,
                    help="re-run a point if other processes took more %% of a core")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a point disturbed by other processes")
    ap.add_argument("--json", metavar="OUT", help="save results as JSON")
    a = ap.parse_args()

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = install_loop()
    if HAVE_TASKSET and os.cpu_count() >= 2:
        os.sched_setaffinity(0, {0})
        print("pinning: target on CPU 1 (unpinned with --workers > 1); upstream and load generator on CPU 0 (taskset)")
    else:
        print("pinning: none (taskset missing or fewer than 2 CPUs)")
    print(f"event loops: load generator, upstream and relay use {loop}; vandamme runs on this interpreter "
          f"({sys.executable}), which {'has' if loop == 'uvloop' else 'lacks'} uvloop")
    log_dir = tempfile.mkdtemp(prefix="vandamme-bench-")
    tlist = targets(a, log_dir)
    out = {"command": ["python", *sys.argv], "loop": loop, "taskset": HAVE_TASKSET, "chunks": a.chunks}
    if a.streams_memory:
        out["streams_memory"] = [asyncio.run(streams_memory(a, t, log_dir)) for t in tlist]
    else:
        results = asyncio.run(run_matrix(a, tlist, parse_points(a.points), log_dir))
        out["results"] = results
        out["table"], out["markdown"] = report(results, a)
    if not a.no_convert and any(t["name"] == "vandamme" for t in tlist):
        c = convert_bench()
        out["convert"] = c
        if "error" in c:
            print(f"\nconversion micro-benchmark: {c['error']}")
        else:
            print(f"\nconversion micro-benchmark: {c['function']} on {c['fixture']} ({c['bytes']} bytes): "
                  f"median {c['median_us']:.0f} us, p99 {c['p99_us']:.0f} us over {c['iterations']} runs; "
                  f"for scale: json.loads of the body {c['json_loads_us']:.0f} us, json.dumps of the payload "
                  f"{c['json_dumps_payload_us']:.0f} us"
                  + (f", count_payload_tokens {c['count_payload_tokens_us']:.0f} us"
                     if "count_payload_tokens_us" in c else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"saved {a.json}")
    print(f"logs: {log_dir}")


if __name__ == "__main__":
    main()
