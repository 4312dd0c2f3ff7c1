"""Fake upstream for the benchmark and the soak test, on raw asyncio streams (fast, full control of bytes).

Serves:
  POST /v1/chat/completions   OpenAI: JSON, or SSE with --chunks content chunks paced by --delay-ms,
                              a usage chunk when stream_options.include_usage is set, then `data: [DONE]`
  POST /v1/messages           the same reply natively in Anthropic format (JSON or SSE), for the byte relay
  POST /v1/responses          the same reply in the OpenAI Responses format (JSON, or its SSE events)
  GET  /v1/models, /health, /stats (request counters and responses in progress)

With --faults P (soak mode) a request whose body carries `BENCHRID-<n>-` gets the reply planned by
plan(n): text, tool calls, parallel tool calls or reasoning, and with probability P one fault (reset,
5xx, slow first byte, stream cut, garbage SSE lines, malformed JSON, in-band error, or a clean stream
paced at 50 ms a chunk so that clients can hang up in the middle of it). soak.py uses the
same plan() to know what each request should produce.

Run: python bench/upstream.py --port 9001 [--chunks 50] [--delay-ms 0] [--first-delay-ms 0] [--faults 0.3]
"""
import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import sys

sys.dont_write_bytecode = True   # keep bench/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Incomplete, chunk, install_loop, read_body, read_head, response_head  # noqa: E402

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
RID_RE = re.compile(rb"BENCHRID-(\d+)-")
USAGE = {"prompt_tokens": 12000, "completion_tokens": 60, "total_tokens": 12060}

# Hostile upstreams too: "echo" repeats the request's Authorization header in a 401 (as OpenAI does with
# a wrong key), "redirect" answers 302 to another host, "oversized" sends a body or an SSE line of 2 MiB
# (soak.py runs the proxy with MAX_RESPONSE_BYTES=1 MiB).
FAULTS_STREAM = ["reset", "status", "slow", "slow_timeout", "cut", "garbage", "badjson", "comment", "inband",
                 "paced", "echo", "redirect", "oversized"]
FAULTS_JSON = ["reset", "status", "slow", "slow_timeout", "badjson", "truncated", "echo", "redirect", "oversized"]
OVERSIZED = 2 << 20


def plan(rid, fault_rate, streaming):
    """Deterministic reply for request rid: what the upstream sends and which fault it injects."""
    rnd = random.Random(rid)
    kind = rnd.choice(["text", "text", "tool", "parallel", "reasoning"])
    words = [f"w{rid}_{i} " for i in range(rnd.randint(1, 12))]
    p = {"rid": rid, "kind": kind, "text": words, "reasoning": [], "tools": [], "fault": None,
         "streaming": streaming}
    if kind == "reasoning":
        p["reasoning"] = [f"think{i} " for i in range(3)]
    if kind in ("tool", "parallel"):
        p["tools"].append(("Bash", {"command": f"echo {rid}", "description": "say \"hi\" ünï"}))
        if kind == "parallel":
            p["text"] = []
            p["tools"].append(("Read", {"file_path": f"/tmp/{rid}.txt", "limit": 5}))
    if rnd.random() < fault_rate:
        p["fault"] = rnd.choice(FAULTS_STREAM if streaming else FAULTS_JSON)
        p["status"] = rnd.choice([429, 500, 502, 503, 400])
        p["cut_at"] = rnd.randint(0, 4)
    return p


def expected(p):
    """What a correct proxy returns for plan p: 'ok' (exact content), 'error', or 'either'."""
    f = p["fault"]
    if f in (None, "comment", "slow", "paced"):    # "paced": a clean stream, 50 ms between chunks
        return "ok"
    if f in ("garbage", "badjson") and p["streaming"]:
        return "either"
    return "error"


def oa_message(p):
    msg = {"role": "assistant", "content": "".join(p["text"]) or None}
    if p["reasoning"]:
        msg["reasoning_content"] = "".join(p["reasoning"])
    if p["tools"]:
        msg["tool_calls"] = [{"id": f"call_{p['rid']}_{i}", "type": "function",
                              "function": {"name": n, "arguments": json.dumps(a)}}
                             for i, (n, a) in enumerate(p["tools"])]
    return {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-bench",
            "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls" if p["tools"] else "stop"}],
            "usage": USAGE}


def oa_events(p, usage):
    """OpenAI SSE event payloads (bytes, without framing) for plan p."""
    def c(delta, finish=None):
        return json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                           "model": "gpt-bench", "choices": [{"index": 0, "delta": delta,
                                                              "finish_reason": finish}]}).encode()
    ev = [c({"role": "assistant", "content": ""})]
    ev += [c({"reasoning_content": r}) for r in p["reasoning"]]
    ev += [c({"content": t}) for t in p["text"]]
    for i, (name, args) in enumerate(p["tools"]):
        ev.append(c({"tool_calls": [{"index": i, "id": f"call_{p['rid']}_{i}", "type": "function",
                                     "function": {"name": name, "arguments": ""}}]}))
        s = json.dumps(args)
        cuts = [0, len(s) // 3, 2 * len(s) // 3, len(s)]
        ev += [c({"tool_calls": [{"index": i, "function": {"arguments": s[a:b]}}]})
               for a, b in itertools.pairwise(cuts)]
    ev.append(c({}, "tool_calls" if p["tools"] else "stop"))
    if usage:
        ev.append(json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                              "model": "gpt-bench", "choices": [], "usage": USAGE}).encode())
    return [b"data: " + e + b"\n\n" for e in ev] + [b"data: [DONE]\n\n"]


def anthropic_reply(text_parts):
    """Native Anthropic message (JSON bytes) and event stream (list of frames) with the same text."""
    usage = {"input_tokens": 12000, "output_tokens": 60}
    msg = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
           "content": [{"type": "text", "text": "".join(text_parts)}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": usage}

    def f(ev, obj):
        return f"event: {ev}\ndata: {json.dumps(obj)}\n\n".encode()
    start = dict(msg, content=[], stop_reason=None, usage={"input_tokens": 12000, "output_tokens": 1})
    frames = [f("message_start", {"type": "message_start", "message": start}),
              f("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
              f("ping", {"type": "ping"})]
    frames += [f("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": t}}) for t in text_parts]
    frames += [f("content_block_stop", {"type": "content_block_stop", "index": 0}),
               f("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                   "stop_sequence": None}, "usage": {"output_tokens": 60}}),
               f("message_stop", {"type": "message_stop"})]
    return json.dumps(msg).encode(), frames


def responses_reply(text_parts):
    """The reply as a Responses API object (JSON bytes) and its event stream (list of frames)."""
    usage = {"input_tokens": 12000, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 60,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12060}
    item = {"type": "message", "id": "msg_bench", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "".join(text_parts), "annotations": []}]}
    final = {"id": "resp_bench", "object": "response", "created_at": 0, "status": "completed", "error": None,
             "incomplete_details": None, "model": "gpt-bench", "output": [item], "usage": usage}
    at = {"item_id": "msg_bench", "output_index": 0}
    events = [{"type": "response.created", "response": dict(final, status="in_progress", output=[], usage=None)},
              {"type": "response.output_item.added", "output_index": 0, "item": dict(item, content=[])},
              {"type": "response.content_part.added", **at, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}]
    events += [{"type": "response.output_text.delta", **at, "content_index": 0, "delta": t, "logprobs": []}
               for t in text_parts]
    events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": final}]
    return json.dumps(final).encode(), [f"event: {e['type']}\ndata: {json.dumps(dict(e, sequence_number=n))}\n\n"
                                        .encode() for n, e in enumerate(events)]


class Upstream:
    def __init__(self, chunks=50, delay_ms=0.0, first_delay_ms=0.0, faults=0.0):
        self.delay, self.first_delay, self.faults = delay_ms / 1000, first_delay_ms / 1000, faults
        self.paced = chunks             # pauses per stream: one per content chunk
        self.stats = {"requests": 0, "active": 0, "streams": 0, "abandoned": 0, "faults": {}}
        base = {"rid": 0, "text": [f"tok{i} " for i in range(chunks)], "reasoning": [], "tools": []}
        self.oa_json = json.dumps(oa_message(base)).encode()
        self.oa_sse = {u: oa_events(base, u) for u in (False, True)}
        self.an_json, self.an_sse = anthropic_reply(base["text"])
        self.rs_json, self.rs_sse = responses_reply(base["text"])
        self.joined = {id(f): b"".join(map(chunk, f)) + b"0\r\n\r\n"      # precomputed bench streams
                       for f in (self.oa_sse[False], self.oa_sse[True], self.an_sse, self.rs_sse)}

    async def serve(self, host, port):
        return await asyncio.start_server(self.conn, host, port, backlog=4096, limit=1 << 20)

    async def conn(self, reader, writer):
        try:
            while True:
                try:
                    line, headers = await read_head(reader)
                except Incomplete:
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await read_body(reader, headers, until_eof=False)
                method, path = line.split(" ")[:2]
                self.stats["requests"] += 1
                self.stats["active"] += 1
                try:
                    self.auth = headers.get("authorization", "")
                    keep = await self.route(method, path.split("?")[0], body, writer)
                finally:
                    self.stats["active"] -= 1
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (OSError, Incomplete, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def send_json(self, writer, status, data):
        writer.write(response_head(status, "application/json", len(data)) + data)
        await writer.drain()
        return True

    async def send_sse(self, writer, frames, delay=None, cut_at=None):
        self.stats["streams"] += 1
        delay = self.delay if delay is None else delay
        head = response_head(200, "text/event-stream", None, ("Cache-Control: no-cache",))
        if not delay and cut_at is None:      # unpaced: the whole stream in one write
            whole = self.joined.get(id(frames)) or b"".join(map(chunk, frames)) + b"0\r\n\r\n"
            writer.write(head + whole)
            await writer.drain()
            return True
        writer.write(head)
        try:
            for i, fr in enumerate(frames):
                if i == cut_at:
                    writer.transport.abort()
                    return False
                if writer.transport.is_closing():
                    raise ConnectionResetError
                writer.write(chunk(fr))
                if delay and i < self.paced:        # the same total pacing for OpenAI and Anthropic streams
                    await writer.drain()
                    await asyncio.sleep(delay)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        except ConnectionError:                 # the proxy hung up mid-stream: stop, as a real server would
            self.stats["abandoned"] += 1
            return False

    async def route(self, method, path, body, writer):
        if method == "GET":
            if path == "/stats":     # "active" leaves out this request itself
                stats = dict(self.stats, active=self.stats["active"] - 1)
                return await self.send_json(writer, 200, json.dumps(stats).encode())
            if path.endswith("/models"):
                return await self.send_json(writer, 200, b'{"object":"list","data":[{"id":"gpt-bench"}]}')
            return await self.send_json(writer, 200, b'{"status":"ok"}')
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/messages", "/chat/completions",
                                            "/v1/responses"):
            return await self.send_json(writer, 404, b'{"error":{"message":"not found","type":"not_found"}}')
        streaming = STREAM_RE.search(body) is not None
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        if path == "/v1/messages":
            if streaming:
                return await self.send_sse(writer, self.an_sse)
            return await self.send_json(writer, 200, self.an_json)
        if path == "/v1/responses":
            if streaming:
                return await self.send_sse(writer, self.rs_sse)
            return await self.send_json(writer, 200, self.rs_json)
        m = RID_RE.search(body) if self.faults else None
        if m is None:
            if streaming:
                return await self.send_sse(writer, self.oa_sse[USAGE_RE.search(body) is not None])
            return await self.send_json(writer, 200, self.oa_json)
        return await self.faulty(plan(int(m.group(1)), self.faults, streaming), streaming,
                                 USAGE_RE.search(body) is not None, writer)

    async def faulty(self, p, streaming, usage, writer):
        f = p["fault"]
        self.stats["faults"][f or "none"] = self.stats["faults"].get(f or "none", 0) + 1
        if f == "reset":
            writer.transport.abort()
            return False
        if f == "status":
            body = json.dumps({"error": {"message": f"injected {p['status']}", "type": "server_error",
                                         "code": None}}).encode()
            extra = ("Retry-After: 1",) if p["status"] == 429 else ()
            writer.write(response_head(p["status"], "application/json", len(body), extra) + body)
            await writer.drain()
            return True
        if f in ("echo", "redirect"):
            message = f"Incorrect API key provided: {self.auth}" if f == "echo" else "moved"
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
            extra = ("Location: http://elsewhere.invalid/v1/chat/completions",) if f == "redirect" else ()
            writer.write(response_head(401 if f == "echo" else 302, "application/json", len(body), extra) + body)
            await writer.drain()
            return True
        if f == "oversized" and not streaming:
            return await self.send_json(writer, 200, b'{"choices": [' + b" " * OVERSIZED + b"]}")
        if f in ("slow", "slow_timeout"):
            await asyncio.sleep(0.8 if f == "slow" else 8.0)
        if not streaming:
            data = json.dumps(oa_message(p)).encode()
            if f == "badjson":
                return await self.send_json(writer, 200, data[: len(data) // 2])
            if f == "truncated":
                writer.write(response_head(200, "application/json", len(data)) + data[: len(data) // 2])
                await writer.drain()
                writer.transport.abort()
                return False
            return await self.send_json(writer, 200, data)
        frames = oa_events(p, usage)
        if f == "garbage":
            frames[1:1] = [b"data: this is not json\n\n", b"\xff\xfe garbage line\n\n", b"event: weird\n\n"]
        elif f == "badjson":
            frames[2:2] = [b'data: {"id":"chatcmpl-bench","choices":[{"index":0,"delta":{"content":"lost\n\n']
        elif f == "comment":
            frames = [b": OPENROUTER PROCESSING\n\n", *frames[:2], b": keep-alive\n\n", *frames[2:]]
        elif f == "oversized":
            frames = [*frames[:2], b'data: {"choices":[{"delta":{"content":"' + b"x" * OVERSIZED + b'"}}]}\n\n']
        elif f == "inband":
            frames = [*frames[:2], b'data: {"error":{"message":"injected in-band error","type":"server_error"}}\n\n']
        cut = min(p["cut_at"], len(frames) - 3) if f == "cut" else None
        return await self.send_sse(writer, frames, delay=0.05 if f == "paced" else 0, cut_at=cut)


async def main(a, loop_name):
    print(f"upstream loop: {loop_name}", flush=True)
    up = Upstream(a.chunks, a.delay_ms, a.first_delay_ms, a.faults)
    server = await up.serve(a.host, a.port)
    print(f"upstream listening on http://{a.host}:{a.port}", flush=True)
    async with server:
        await asyncio.sleep(a.max_seconds)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--first-delay-ms", type=float, default=0.0)
    ap.add_argument("--faults", type=float, default=0.0)
    ap.add_argument("--max-seconds", type=float, default=3600, help="exit after this long (safety bound)")
    args = ap.parse_args()
    name = install_loop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args, name))
