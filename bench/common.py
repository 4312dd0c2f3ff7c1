"""Shared helpers for the vandamme benchmark and soak test (not run directly).

- minimal HTTP/1.1 over asyncio streams (client side and server side),
- Anthropic SSE parsing and a strict stream-grammar checker,
- /proc readers for CPU time, resident memory and open file descriptors of a process tree,
- starting and stopping child processes (pinned to a CPU with taskset when available).
"""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("BENCH_FIXTURES", "/work/shared/fixtures/claude-code")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def install_loop():
    """Use uvloop when importable; return the name of the loop in use."""
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


# ---------------------------------------------------------------- HTTP/1.1

class Incomplete(Exception):
    """The peer closed the connection before the message was complete."""


async def read_head(reader):
    """Read a request or status line plus headers; return (first_line, {lower-name: value})."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise Incomplete("closed inside headers" if e.partial else "closed before headers") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers


async def read_body(reader, headers, on_first=None, until_eof=True):
    """Read a whole body framed by chunked encoding, Content-Length or (until_eof) the connection's end.

    on_first() is called when the first body byte is available (time to first byte)."""
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts, buf, pos = [], b"", 0
            while True:                       # decode from a buffer: few awaits per response
                data = await reader.read(1 << 16)
                if not data:
                    raise Incomplete("body cut inside chunked encoding")
                if on_first:
                    on_first()
                    on_first = None
                buf = buf[pos:] + data if pos else buf + data
                pos = 0
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = int(buf[pos:eol].split(b";")[0], 16)
                    if size == 0:
                        end = buf.find(b"\r\n\r\n", eol)
                        if end < 0:
                            break
                        return b"".join(parts)
                    if len(buf) < eol + 4 + size:
                        break
                    parts.append(buf[eol + 2:eol + 2 + size])
                    pos = eol + 4 + size
        if "content-length" in headers:
            n = int(headers["content-length"])
            if n == 0:
                return b""
            first = await reader.read(n)
            if on_first and first:
                on_first()
            if len(first) < n:
                first += await reader.readexactly(n - len(first))
            return first
        if not until_eof:
            return b""
        data = await reader.read()
        if on_first:
            on_first()
        return data
    except (asyncio.IncompleteReadError, ValueError) as e:
        raise Incomplete(f"body cut: {type(e).__name__}") from None


def request_bytes(method, path, port, body=b"", extra=()):
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "anthropic-version: 2023-06-01", "x-api-key: bench", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def http_json(port, method, path, body=b"", timeout=5.0):
    """One-off request on a fresh connection; return (status, parsed JSON or raw bytes)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        w.write(request_bytes(method, path, port, body, ("Connection: close",)))
        first, headers = await asyncio.wait_for(read_head(r), timeout)
        data = await asyncio.wait_for(read_body(r, headers), timeout)
    finally:
        w.close()
    try:
        return int(first.split()[1]), json.loads(data)
    except ValueError:
        return int(first.split()[1]), data


def response_head(status, ctype, length=None, extra=()):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
              500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", *extra]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


# ---------------------------------------------------------------- Anthropic protocol checks

def fixture(name="messages_basic_sonnet.json"):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def fold_system_messages(body):
    """Copy of a request with role:"system" messages moved into the top-level system array
    (for peers that reject them; Claude Code sends one mid-conversation)."""
    body = dict(body)
    system = body.get("system") or []
    system = [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    keep = []
    for m in body["messages"]:
        if m.get("role") != "system":
            keep.append(m)
        elif isinstance(m.get("content"), str):
            system.append({"type": "text", "text": m["content"]})
        else:
            system += [b for b in m.get("content") or [] if b.get("type") == "text"]
    body.update(messages=keep, system=system)
    return body


def quick_check(streaming, status, body):
    """Cheap validation for the load generator; returns None if fine, else a reason."""
    if status != 200:
        return f"http_{status}"
    if not streaming:
        try:
            return None if json.loads(body).get("type") == "message" else "not_a_message"
        except ValueError:
            return "bad_json"
    frames = body.replace(b"\r\n", b"\n").strip().split(b"\n\n")
    if not frames[0].startswith(b"event: message_start") and not frames[0].startswith(b"event:message_start"):
        return "no_message_start_first"
    if not frames[-1].startswith(b"event: message_stop") and not frames[-1].startswith(b"event:message_stop"):
        return "no_message_stop_last"
    if any(not f.startswith(b"event:") for f in frames) or b"[DONE]" in body:
        return "frame_without_event"
    return None


def parse_sse(text):
    """Split an SSE body into [(event or None, data or None)] frames."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event = data = None
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            k, _, v = line.partition(":")
            v = v[1:] if v.startswith(" ") else v
            if k == "event":
                event = v
            elif k == "data":
                data = v if data is None else data + "\n" + v
        if event is None and data is None:
            continue
        frames.append((event, data))
    return frames


STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                "model_context_window_exceeded"}
DELTAS = {"text": {"text_delta": "text", "citations_delta": "citation"},
          "thinking": {"thinking_delta": "thinking", "signature_delta": "signature"},
          "redacted_thinking": {},
          "tool_use": {"input_json_delta": "partial_json"},
          "server_tool_use": {"input_json_delta": "partial_json"}}


def check_error_body(obj):
    """Anthropic error object: {"type":"error","error":{"type":str,"message":str}}."""
    if not isinstance(obj, dict) or obj.get("type") != "error":
        return "error body without type=error"
    err = obj.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("type"), str) or not isinstance(err.get("message"), str):
        return "error body without error.type/error.message strings"
    return None


def check_message(msg):
    """Validate a non-streaming Anthropic Message; return (violations, summary)."""
    v = []
    if msg.get("type") != "message" or msg.get("role") != "assistant":
        v.append("message type/role wrong")
    if msg.get("stop_reason") not in STOP_REASONS:
        v.append(f"bad stop_reason {msg.get('stop_reason')!r}")
    u = msg.get("usage")
    if not isinstance(u, dict) or not all(isinstance(u.get(k), int) for k in ("input_tokens", "output_tokens")):
        v.append("usage missing input_tokens/output_tokens ints")
    content = msg.get("content")
    if not isinstance(content, list):
        return [*v, "content is not a list"], None
    for b in content:
        t = b.get("type") if isinstance(b, dict) else None
        if t == "text" and not isinstance(b.get("text"), str):
            v.append("text block without text")
        elif t == "tool_use" and not (isinstance(b.get("input"), dict) and b.get("id") and b.get("name")):
            v.append("tool_use block needs id, name and object input")
        elif t == "thinking" and not isinstance(b.get("thinking"), str):
            v.append("thinking block without thinking")
        elif t not in DELTAS:
            v.append(f"unknown content block type {t!r}")
    return v, summarize(content, msg.get("stop_reason"))


def summarize(content, stop_reason):
    """What a response says, for comparing with what the upstream sent."""
    text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
    tools = [(b.get("name"), b.get("input")) for b in content if b.get("type") == "tool_use"]
    return {"text": text, "tools": tools, "stop_reason": stop_reason}


def check_stream(text):
    """Strict grammar check of an Anthropic SSE body.

    Returns (violations, summary, ended_with_error); summary is None unless the stream completed."""
    v = []
    state = "start"      # start -> open -> delta_sent -> stopped | errored
    blocks, cur, partial = [], None, []
    stop_reason = None
    for n, (event, data) in enumerate(parse_sse(text)):
        where = f"frame {n} ({event})"
        if state in ("stopped", "errored"):
            v.append(f"{where}: frame after {'message_stop' if state == 'stopped' else 'error'}")
            break
        if event is None:
            v.append(f"{where}: frame without event: line" + (" ([DONE])" if data == "[DONE]" else ""))
            continue
        try:
            obj = json.loads(data) if data is not None else None
        except ValueError:
            v.append(f"{where}: data is not JSON")
            continue
        if not isinstance(obj, dict) or obj.get("type") != event:
            v.append(f"{where}: data.type != event name")
            continue
        if event == "ping":
            continue
        if event == "error":
            e = check_error_body(obj)
            if e:
                v.append(f"{where}: {e}")
            state = "errored"
            continue
        if state == "start":
            if event != "message_start":
                v.append(f"{where}: first event is not message_start")
                break
            m = obj.get("message") or {}
            if m.get("type") != "message" or m.get("role") != "assistant" or m.get("content") != []:
                v.append(f"{where}: message_start.message malformed")
            state = "open"
            continue
        if event == "message_start":
            v.append(f"{where}: second message_start")
        elif event == "content_block_start":
            if state != "open":
                v.append(f"{where}: block start after message_delta")
            if cur is not None:
                v.append(f"{where}: block {cur[0]} still open")
            cb = obj.get("content_block") or {}
            if obj.get("index") != len(blocks):
                v.append(f"{where}: index {obj.get('index')} expected {len(blocks)}")
            if cb.get("type") not in DELTAS:
                v.append(f"{where}: unknown block type {cb.get('type')!r}")
            if cb.get("type") == "tool_use" and not (cb.get("id") and cb.get("name") and cb.get("input") == {}):
                v.append(f"{where}: tool_use start needs id, name, input {{}}")
            cur = (len(blocks), cb.get("type"))
            blocks.append(dict(cb))
            partial = []
        elif event == "content_block_delta":
            d = obj.get("delta") or {}
            if cur is None or obj.get("index") != cur[0]:
                v.append(f"{where}: delta for index {obj.get('index')} but open block is {cur and cur[0]}")
                continue
            field = DELTAS.get(cur[1], {}).get(d.get("type"))
            if field is None or not isinstance(d.get(field), (str, dict)):
                v.append(f"{where}: delta {d.get('type')!r} invalid in {cur[1]} block")
                continue
            b = blocks[cur[0]]
            if field == "partial_json":
                partial.append(d[field])
            elif field in ("text", "thinking", "signature"):
                b[field] = b.get(field, "") + d[field]
        elif event == "content_block_stop":
            if cur is None or obj.get("index") != cur[0]:
                v.append(f"{where}: stop for index {obj.get('index')} but open block is {cur and cur[0]}")
                continue
            if cur[1] in ("tool_use", "server_tool_use"):
                raw = "".join(partial)
                try:
                    blocks[cur[0]]["input"] = json.loads(raw) if raw else {}
                    if not isinstance(blocks[cur[0]]["input"], dict):
                        raise ValueError
                except ValueError:
                    v.append(f"{where}: tool input is not a JSON object: {raw[:60]!r}")
            cur = None
        elif event == "message_delta":
            if state != "open":
                v.append(f"{where}: more than one message_delta")
            if cur is not None:
                v.append(f"{where}: message_delta while block {cur[0]} open")
            stop_reason = (obj.get("delta") or {}).get("stop_reason")
            if stop_reason not in STOP_REASONS:
                v.append(f"{where}: bad stop_reason {stop_reason!r}")
            if not isinstance((obj.get("usage") or {}).get("output_tokens"), int):
                v.append(f"{where}: message_delta.usage.output_tokens missing")
            state = "delta_sent"
        elif event == "message_stop":
            if state != "delta_sent":
                v.append(f"{where}: message_stop without message_delta")
            state = "stopped"
        else:
            v.append(f"{where}: unknown event")
    if state not in ("stopped", "errored"):
        v.append(f"stream ended without message_stop or error (state {state})")
    summary = summarize(blocks, stop_reason) if state == "stopped" else None
    return v, summary, state == "errored"


# ---------------------------------------------------------------- processes and /proc

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid):
    """pid and all its descendants."""
    todo, seen = [pid], []
    while todo and len(seen) < 256:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime
        except OSError:
            pass
    return total / TICK


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def hwm_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def open_fds(pids):
    n = 0
    for p in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{p}/fd"))
    return n


HAVE_TASKSET = shutil.which("taskset") is not None


class Proc:
    """A child process in its own session, optionally pinned to CPUs; stop() ends its whole group."""

    def __init__(self, name, argv, env=None, cpus=None, log_dir="/tmp"):
        self.name = name
        if cpus and HAVE_TASKSET:
            argv = ["taskset", "-c", cpus, *argv]
        self.log_path = os.path.join(log_dir, f"bench-{name}-{os.getpid()}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=self.log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()


def wait_port(port, proc=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout}s" + (f":\n{proc.tail()}" if proc else ""))
