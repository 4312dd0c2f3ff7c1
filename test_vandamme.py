"""Tests for vandamme.py. Sections mirror the module's §-sections.

Everything runs the real thing: the proxy as an aiohttp app (or a real process), in front of
fake upstreams that are real local aiohttp servers recording what they receive. Nothing of
ours is mocked; time and environment are injected.
"""
from __future__ import annotations

import ast
import asyncio
import collections
import contextlib
import dataclasses
import gzip
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import vandamme as vd

# Optional clients: without one, only the tests that use it skip (with the reason), never the suite.
try:
    import anthropic
except ImportError:
    anthropic = None
needs_anthropic_sdk = pytest.mark.skipif(anthropic is None, reason="anthropic SDK not installed "
                                         "(pip install -e '.[test]')")
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    class _Absent:
        """Stands in for hypothesis's names so the strategies below still build; `given` skips."""

        def __getattr__(self, _name: str) -> Any:
            return self

        def __call__(self, *_args: Any, **_kwargs: Any) -> Any:
            return self

        def __or__(self, _other: Any) -> Any:
            return self

        def __iter__(self) -> Iterator[Any]:
            return iter(())

    st = HealthCheck = _Absent()

    def settings(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
        return lambda test: test

    def given(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
        return pytest.mark.skip(reason="hypothesis not installed (pip install -e '.[test]'): property test")

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
FIXTURES = SHARED / "fixtures" / "claude-code"
ALL_FIXTURES = sorted(FIXTURES.glob("messages_*.json")) if FIXTURES.is_dir() else []
NEEDS_FIXTURES = f"needs ../shared/fixtures/claude-code (the shared reference fixtures; not found at {FIXTURES})"
FIXTURE_PARAMS = [pytest.param(path, id=path.stem) for path in ALL_FIXTURES] or [
    pytest.param(None, id="no-shared-fixtures", marks=pytest.mark.skip(reason=NEEDS_FIXTURES))]


def shared_fixture(name: str) -> Path:
    """One file of the shared reference fixtures; the test skips, saying so, when it is absent."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(NEEDS_FIXTURES)
    return path


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll `condition` (sync or async) until it holds; fail the test when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            try:
                what = inspect.getsource(condition).strip()
            except (OSError, TypeError):
                what = repr(condition)
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# Helpers: fake upstreams, stream validator, proxy factory
# ---------------------------------------------------------------------------

def sse(*chunks: Any, done: bool = True) -> bytes:
    """OpenAI-style SSE body from chunks (dicts are JSON-encoded, bytes go as they are)."""
    out = b""
    for chunk in chunks:
        out += chunk if isinstance(chunk, bytes) else b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return out + (b"data: [DONE]\n\n" if done else b"")


def delta(**fields: Any) -> dict:
    finish = fields.pop("finish_reason", None)
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": fields, "finish_reason": finish}]}


def finish(reason: str = "stop") -> dict:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def usage_chunk(prompt: int = 11, completion: int = 7, cached: int = 0) -> dict:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"choices": [], "usage": usage}


def completion(content: Any = "Hello!", *, tool_calls: list | None = None, finish_reason: str = "stop",
               usage: dict | None = None, **message: Any) -> dict:
    msg = {"role": "assistant", "content": content, **message}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "upstream-model",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 5}}


# The Responses API as ../shared/reference/responses-api.md documents it: shapes, events, and what it refuses.
RESPONSES_KEYS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
                  "temperature", "top_p", "reasoning", "store", "include", "stream", "text", "metadata", "truncation",
                  "service_tier", "safety_identifier", "prompt_cache_key", "user", "background", "max_tool_calls",
                  "previous_response_id", "stream_options", "prompt", "conversation", "context_management"}
ITEM_KEYS = {"message": {"type", "role", "content", "id", "status", "phase"},
             "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
             "function_call_output": {"type", "call_id", "output", "id", "status"},
             "reasoning": {"type", "id", "summary", "encrypted_content", "content", "status"}}
PART_KEYS = {"input_text": {"type", "text"}, "input_image": {"type", "image_url", "file_id", "detail"},
             "input_file": {"type", "filename", "file_data", "file_id", "file_url"},
             "output_text": {"type", "text", "annotations", "logprobs"}, "refusal": {"type", "refusal"}}


def _parts_rejection(parts: Any, where: str, allowed: set[str]) -> str | None:
    if isinstance(parts, str):
        return None
    for n, part in enumerate(parts if isinstance(parts, list) else [None]):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed or set(part) - PART_KEYS[kind]:
            return f"Invalid value: '{where}[{n}]'."
    return None


def _item_rejection(items: list, i: int, store: Any, calls: set) -> str | None:
    item, where = items[i], f"input[{i}]"
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind not in ITEM_KEYS or set(item) - ITEM_KEYS[kind]:
        return f"Unknown parameter: '{where}.{sorted(set(item) - ITEM_KEYS.get(kind, set()))[:1]}'."
    if kind == "message":
        if item.get("role") not in ("user", "assistant", "system", "developer"):
            return f"Invalid value: '{where}.role'."
        user_parts = {"input_text", "input_image", "input_file"}
        return _parts_rejection(item.get("content"), f"{where}.content",
                                {"output_text", "refusal"} if item["role"] == "assistant" else user_parts)
    if kind == "function_call":
        if "id" in item and not str(item["id"]).startswith("fc"):
            return "Invalid 'input[].id': Expected an ID that begins with 'fc'."
        if not (isinstance(item.get("arguments"), str) and item.get("call_id") and item.get("name")):
            return f"Missing required parameter: '{where}.call_id/name/arguments'."
        calls.add(item["call_id"])
    elif kind == "function_call_output":
        if item.get("call_id") not in calls:
            return f"No tool call found for function call output with call_id {item.get('call_id')}."
        return _parts_rejection(item.get("output"), f"{where}.output", {"input_text", "input_image", "input_file"})
    elif kind == "reasoning":
        if not item.get("encrypted_content") or not isinstance(item.get("summary"), list):
            return f"Item '{where}' of type 'reasoning' needs 'encrypted_content' and 'summary'."
        if "id" in item and store is False:
            return f"Item with id '{item['id']}' not found. Items are not persisted when 'store' is set to false."
        following = items[i + 1] if i + 1 < len(items) else {}
        if following.get("type", "message") not in ("function_call", "message", "reasoning") or following.get(
                "role", "assistant") != "assistant":
            return f"Item '{where}' of type 'reasoning' was provided without its required following item."
    return None


def responses_rejection(body: Any) -> str | None:
    """The 400 the real Responses API gives this body, or None when it would accept it."""
    if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("input"), (str, list)):
        return "Missing required parameter: 'model' or 'input'."
    if set(body) - RESPONSES_KEYS:
        return f"Unknown parameter: '{sorted(set(body) - RESPONSES_KEYS)[0]}'."
    if body.get("max_output_tokens", 16) < 16:
        return "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, got 1."
    if re.match(r"(o\d|gpt-5|codex)", body["model"]) and {"temperature", "top_p"} & set(body):
        return "Unsupported parameter: 'temperature' is not supported with this model."
    for n, tool in enumerate(body.get("tools", [])):
        if set(tool) - {"type", "name", "description", "parameters", "strict"} or tool.get("type") != "function" \
                or not tool.get("name") or "parameters" not in tool:
            return f"Unknown parameter: 'tools[{n}].function'."
    choice = body.get("tool_choice", "auto")
    if choice not in ("none", "auto", "required") and (not isinstance(choice, dict) or set(choice) != {"type", "name"}):
        return "Invalid value for 'tool_choice'."
    reasoning = body.get("reasoning", {})
    efforts = ("minimal", "low", "medium", "high")
    if set(reasoning) - {"effort", "summary"} or reasoning.get("effort", "low") not in efforts \
            or reasoning.get("summary", "auto") not in ("auto", "concise", "detailed"):
        return "Invalid value for 'reasoning'."
    if set(body.get("include", [])) - {"reasoning.encrypted_content", "message.output_text.logprobs"}:
        return "Invalid value for 'include'."
    items, calls = body["input"] if isinstance(body["input"], list) else [], set()
    for i in range(len(items)):
        if rejection := _item_rejection(items, i, body.get("store"), calls):
            return rejection
    answered = {item.get("call_id") for item in items if item.get("type") == "function_call_output"}
    return f"No tool output found for function call {sorted(calls - answered)[0]}." if calls - answered else None


def reasoning_item(*summary: str, encrypted: str | None = "gAAAA-enc-1", item_id: str = "rs_1") -> dict:
    item = {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": s} for s in summary]}
    return {**item, "encrypted_content": encrypted} if encrypted else item


def message_item(text: str, *, refusal: bool = False, item_id: str = "msg_1") -> dict:
    part = {"type": "refusal", "refusal": text} if refusal else {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": item_id, "role": "assistant", "status": "completed", "content": [part]}


def call_item(call_id: str, name: str, arguments: dict, item_id: str = "fc_1") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": json.dumps(arguments), "status": "completed"}


def resp_object(*output: dict, status: str = "completed", reason: str | None = None, usage: dict | None = None) -> dict:
    return {"id": "resp_1", "object": "response", "created_at": 1767312000, "status": status, "error": None,
            "incomplete_details": {"reason": reason} if reason else None, "model": "gpt-5-codex",
            "output": list(output),
            "usage": usage or {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 9,
                               "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 39}}


def _pieces(text: str) -> list[str]:
    return [text[i:i + 5] for i in range(0, len(text), 5)]


def _item_events(index: int, item: dict) -> list[dict]:
    """One output item's events, in the documented order, text and arguments in small deltas."""
    at = {"output_index": index, "item_id": item["id"]}
    if item["type"] == "reasoning":
        events = [{"type": "response.output_item.added", "output_index": index,
                   "item": {"type": "reasoning", "id": item["id"], "summary": []}}]
        for s, part in enumerate(item["summary"]):
            events.append({"type": "response.reasoning_summary_part.added", **at, "summary_index": s,
                           "part": {"type": "summary_text", "text": ""}})
            events += [{"type": "response.reasoning_summary_text.delta", **at, "summary_index": s, "delta": piece}
                       for piece in _pieces(part["text"])]
            events.append({"type": "response.reasoning_summary_text.done", **at, "summary_index": s,
                           "text": part["text"]})
    elif item["type"] == "function_call":
        events = [{"type": "response.output_item.added", "output_index": index,
                   "item": {**item, "arguments": "", "status": "in_progress"}}]
        events += [{"type": "response.function_call_arguments.delta", **at, "delta": piece}
                   for piece in _pieces(item["arguments"])]
        events.append({"type": "response.function_call_arguments.done", **at, "name": item["name"],
                       "arguments": item["arguments"]})
    else:
        part = item["content"][0]
        events = [{"type": "response.output_item.added", "output_index": index,
                   "item": {**item, "status": "in_progress", "content": []}},
                  {"type": "response.content_part.added", **at, "content_index": 0,
                   "part": {**part, **({"refusal": ""} if "refusal" in part else {"text": ""})}}]
        kind = "response.refusal.delta" if "refusal" in part else "response.output_text.delta"
        events += [{"type": kind, **at, "content_index": 0, "delta": piece}
                   for piece in _pieces(part.get("text", part.get("refusal", "")))]
    return [*events, {"type": "response.output_item.done", "output_index": index, "item": item}]


def resp_events(*output: dict, status: str = "completed", reason: str | None = None, terminal: bool = True) -> list:
    final = resp_object(*output, status=status, reason=reason)
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.created", "response": started}, {"type": "response.in_progress", "response": started}]
    for index, item in enumerate(output):
        events += _item_events(index, item)
    ending = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}
    return events + ([{"type": ending[status], "response": final}] if terminal else [])


def resp_sse(*events: dict) -> bytes:
    """Responses SSE: an `event:` line, a `data:` line with the sequence number, no [DONE]."""
    return b"".join(f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
                    for n, e in enumerate(events))


class Reply:
    """One scripted upstream answer."""

    def __init__(self, body: Any = None, *, status: int = 200, headers: dict | None = None,
                 stream: bytes | list[bytes] | None = None, delay: float = 0.0, chunk_delay: float = 0.0,
                 reset: bool = False, hang: float = 0.0, gate: asyncio.Event | None = None) -> None:
        self.body, self.status, self.headers = body, status, headers or {}
        self.stream, self.delay, self.chunk_delay, self.reset, self.hang = stream, delay, chunk_delay, reset, hang
        self.gate = gate            # set: the answer waits until the test opens it


class FakeUpstream:
    """A real aiohttp server that records requests and answers from a script.

    Without a script it answers chat completions with a text reply (SSE when asked), so
    plain tests need no setup. `closed` counts upstream connections whose handler ended
    (also by the client going away).
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: collections.deque[Reply] = collections.deque()
        self.active = 0
        self.ended = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server: Any = None

    def add(self, *replies: Reply) -> None:
        self.script.extend(replies)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def last(self) -> dict:
        return self.requests[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append({"method": request.method, "path": request.path, "raw_path": request.raw_path,
                              "query": dict(request.query),
                              "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body, "raw": raw})
        self.active += 1
        try:
            return await self._answer(request, body)
        finally:
            self.active -= 1
            self.ended += 1

    async def _answer(self, request: web.Request, body: Any) -> web.StreamResponse:
        if request.path.endswith("/models") and not self.script:
            return web.json_response({"object": "list", "data": [{"id": "model-a", "created": 1}, {"id": "model-b"}]})
        responses = request.path.endswith("/responses")
        if responses and (rejection := responses_rejection(body)):     # what the real Responses API refuses
            return web.json_response({"error": {"message": rejection, "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        reply = self.script.popleft() if self.script else None
        if reply is None:
            streamed = isinstance(body, dict) and body.get("stream")
            if responses:
                reply = Reply(stream=resp_sse(*resp_events(message_item("Hello there")))) if streamed else Reply(
                    resp_object(message_item("Hello there")))
            else:
                reply = Reply(stream=sse(delta(role="assistant", content="Hello"), delta(content=" there"),
                                         finish(), usage_chunk())) if streamed else Reply(completion("Hello there"))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.gate is not None:
            await reply.gate.wait()
        if reply.reset:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if reply.stream is None:
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            return web.Response(body=data, status=reply.status,
                                headers={"Content-Type": "application/json", **reply.headers})
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": "text/event-stream",
                                                                    **reply.headers})
        await response.prepare(request)
        pieces = reply.stream if isinstance(reply.stream, list) else [reply.stream]
        for piece in pieces:
            if piece == b"<reset>":
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(piece)
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        if reply.hang:
            await asyncio.sleep(reply.hang)
        await response.write_eof()
        return response


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Split an Anthropic SSE body into (event, data); asserts every frame has both lines."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: "), f"frame without event line: {block!r}"
        assert lines[1].startswith("data: "), f"frame without data line: {block!r}"
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:], block
        frames.append((lines[0][7:], data))
    return frames


def validate_stream(text: str) -> list[tuple[str, dict]]:
    """Check the Anthropic event grammar; returns the frames. Used on every streaming test."""
    assert "[DONE]" not in text
    frames = parse_sse(text)
    assert frames and frames[0][0] == "message_start", frames[:1]
    open_block: tuple[int, str] | None = None
    next_index = 0
    deltas_for = {"text": {"text_delta", "citations_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                  "tool_use": {"input_json_delta"}}
    saw_delta = saw_stop = False
    tool_json: dict[int, str] = {}
    for n, (name, data) in enumerate(frames[1:], 1):
        assert not saw_stop, "event after message_stop"
        if name == "error":
            assert n == len(frames) - 1, "events after error"
            assert set(data["error"]) >= {"type", "message"}
            return frames
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_block is None, "block started while another is open"
            assert data["index"] == next_index, (data["index"], next_index)
            kind = data["content_block"]["type"]
            if kind == "tool_use":
                assert data["content_block"]["input"] == {} and data["content_block"]["id"]
                tool_json[data["index"]] = ""
            open_block, next_index = (data["index"], kind), next_index + 1
        elif name == "content_block_delta":
            assert open_block is not None and data["index"] == open_block[0]
            assert data["delta"]["type"] in deltas_for[open_block[1]], (open_block, data)
            if data["delta"]["type"] == "input_json_delta":
                tool_json[data["index"]] += data["delta"]["partial_json"]
        elif name == "content_block_stop":
            assert open_block is not None and data["index"] == open_block[0]
            if open_block[1] == "tool_use":
                assert isinstance(json.loads(tool_json[data["index"]] or "{}"), dict)
            open_block = None
        elif name == "message_delta":
            assert open_block is None and not saw_delta
            assert data["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use", "stop_sequence",
                                                    "refusal", "pause_turn")
            assert isinstance(data["usage"]["output_tokens"], int)
            saw_delta = True
        elif name == "message_stop":
            assert saw_delta
            saw_stop = True
        else:
            raise AssertionError(f"unknown event {name}")
    assert saw_stop, "stream did not end with message_stop"
    return frames


def final_message(frames: list[tuple[str, dict]]) -> dict:
    """Accumulate frames like the SDK does."""
    message = dict(frames[0][1]["message"])
    message["content"] = []
    partial: dict[int, str] = {}
    for name, data in frames[1:]:
        if name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, d = message["content"][data["index"]], data["delta"]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
            elif d["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + d["partial_json"]
        elif name == "content_block_stop" and data["index"] in partial:
            message["content"][data["index"]]["input"] = json.loads(partial[data["index"]] or "{}")
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = {**message["usage"], **data["usage"]}
    return message


def make_config(env: dict[str, str] | None = None, tmp: Path | None = None, **kwargs: Any) -> vd.Config:
    """A Config from an explicit environment only (never the machine's)."""
    home = tmp or Path("/nonexistent-vandamme-home")
    return vd.load_config(env or {}, cwd=kwargs.pop("cwd", home), home=home, **kwargs)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app)
    return fake


@pytest.fixture
def proxy(aiohttp_client: Any, upstream: FakeUpstream, tmp_path: Path) -> Any:
    """Factory: a test client for a proxy whose `openai` provider is the fake upstream."""
    async def start(env: dict[str, str] | None = None, *, middleware: list | None = None, **settings: Any) -> Any:
        full = {"OPENAI_API_KEY": "sk-test-0000000000001", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                "REQUEST_TIMEOUT": "5", "MAX_RETRIES": "0"}
        full.update({k: v.replace("{upstream}", upstream.url) for k, v in (env or {}).items()})
        config = make_config(full, tmp_path)
        for key, value in settings.items():
            config = dataclasses.replace(config, **{key: value})
        return await aiohttp_client(vd.create_app(config, middleware=middleware))
    return start


BASIC = {"model": "claude-sonnet-5-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}


async def post_stream(client: Any, body: dict, **kwargs: Any) -> tuple[Any, list[tuple[str, dict]]]:
    response = await client.post("/v1/messages", json={**body, "stream": True}, **kwargs)
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response, validate_stream(text)


# ---------------------------------------------------------------------------
# Meta: table of contents, defaults
# ---------------------------------------------------------------------------

def test_toc_matches_section_banners() -> None:
    source = (HERE / "vandamme.py").read_text()
    toc = re.findall(r"^    (§\d+)\s+(.+)$", vd.__doc__ or "", re.M)
    banners = re.findall(r"^# (§\d+)\s+(.+)$", source, re.M)
    assert [(n, t.strip()) for n, t in toc] == [(n, t.strip()) for n, t in banners]
    assert len(banners) >= 10


def test_test_sections_follow_the_module_sections() -> None:
    tests = [int(n) for n in re.findall(r"^# §(\d+) ", (HERE / "test_vandamme.py").read_text(), re.M)]
    module = [int(n) for n in re.findall(r"^# §(\d+)  ", (HERE / "vandamme.py").read_text(), re.M)]
    assert tests == sorted(tests) and set(tests) <= set(module) and len(set(tests)) >= 10


IO_CALLS = re.compile(r"^(open|print|input|(os|socket|subprocess|aiohttp|web|asyncio|tempfile|shutil|signal|sys)\..*"
                      r"|time\.(time|monotonic)|random\..*|.*\.(read_text|read_bytes|write_text|is_file|exists))$")


def test_everything_above_the_divider_is_pure() -> None:
    """No file, socket, environment, clock or randomness call above the pure/I-O divider (injected ones are fine)."""
    source = (HERE / "vandamme.py").read_text()
    first = source[:source.index("# §1 ")].count("\n")          # the header's Python-version guard may print
    divider = source[:source.index("# ---- everything above is pure; everything below does I/O ----")].count("\n")
    calls = [(node.lineno, ast.unparse(node.func)) for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and first < node.lineno < divider]
    assert len(calls) > 100 and [c for c in calls if IO_CALLS.match(c[1])] == []


def test_defaults_toml_is_the_rendered_provider_table() -> None:
    assert (HERE / "defaults.toml").read_text() == vd.defaults_toml(), (
        "regenerate: python -c \"import vandamme; print(vandamme.defaults_toml(), end='')\" > defaults.toml")


def test_pep723_block_declares_aiohttp() -> None:
    head = (HERE / "vandamme.py").read_text().splitlines()[:8]
    assert "# /// script" in head and any("aiohttp" in line for line in head)


def test_every_builtin_provider_is_in_defaults() -> None:
    data = tomllib.loads(vd.defaults_toml())
    for name in ("openai", "anthropic", "gemini", "deepseek", "openrouter", "poe", "groq", "mistral", "xai",
                 "together", "fireworks", "cerebras", "zai", "ollama", "lmstudio", "vllm"):
        assert data[name]["base-url"].startswith("http"), name
    assert data["anthropic"]["api-format"] == data["zai"]["api-format"] == "anthropic"
    for name in ("ollama", "lmstudio", "vllm"):
        assert data[name]["keyless"] is True


def test_every_env_var_is_documented_in_help_and_readme(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        vd.main(["--help"], environ={})
    out = capsys.readouterr().out
    readme = (HERE / "README.md").read_text()
    for name in vd.ENV_VARS:
        assert name in out, name
        assert name in readme, name


# ---------------------------------------------------------------------------
# §3 Configuration
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("A=1\nB=two", {"A": "1", "B": "two"}, id="plain"),
    pytest.param("# comment\n\nA=1 # trailing", {"A": "1"}, id="comments"),
    pytest.param("export A=1", {"A": "1"}, id="export"),
    pytest.param('A="x y # z"\nB=\'q\'', {"A": "x y # z", "B": "q"}, id="quotes"),
    pytest.param('A="line\\nnext"', {"A": "line\nnext"}, id="escaped-newline"),
    pytest.param("not a line\n=x\nA=", {"A": ""}, id="junk-skipped"),
    pytest.param("KEY = spaced ", {"KEY": "spaced"}, id="spaces"),
])
def test_parse_dotenv(text: str, expected: dict) -> None:
    assert vd.parse_dotenv(text) == expected


def test_provider_from_api_key_uses_builtin_base_url() -> None:
    config = make_config({"OPENAI_API_KEY": "sk-a sk-b"})
    provider = config.provider("openai")
    assert provider and provider.keys == ("sk-a", "sk-b") and provider.base_url == "https://api.openai.com/v1"
    assert config.default_provider == "openai"


def test_base_url_alone_defines_keyless_provider() -> None:
    config = make_config({"MYLLM_BASE_URL": "http://127.0.0.1:9/v1"})
    provider = config.provider("myllm")
    assert provider and provider.keys == () and config.default_provider == "myllm"


def test_unknown_provider_without_base_url_is_skipped_with_hint() -> None:
    config = make_config({"NOPE_API_KEY": "k", "OPENAI_API_KEY": "sk"})
    assert config.provider("nope") is None
    assert any("NOPE_BASE_URL" in w for w in config.warnings)
    # a user table makes a provider known, but never its own "did you mean"
    toml = [("local", Path("vandamme-config.toml"), {"myllm": {"aliases": {"x": "y"}}})]
    own = vd.parse_config({"MYLLM_API_KEY": "k", "OPENAI_API_KEY": "sk", "OPENAI_MAX_TOKEN": "9"}, {}, toml)
    assert "provider 'myllm' skipped: no known base URL; set MYLLM_BASE_URL" in own.warnings
    assert "OPENAI_MAX_TOKEN is not a vandamme setting: did you mean OPENAI_MAX_TOKENS?" in own.warnings


def test_proxy_api_key_is_not_a_provider() -> None:
    config = make_config({"PROXY_API_KEY": "secret", "OPENAI_API_KEY": "sk"})
    assert [p.name for p in config.providers] == ["openai"]


@pytest.mark.parametrize(("env", "fragment"), [
    pytest.param({"OPENAI_API_KEY": "k", "OPENAI_API_FORMAT": "grpc"}, "OPENAI_API_FORMAT", id="bad-format"),
    pytest.param({"OPENAI_API_KEY": "!PASSTHRU sk-1"}, "OPENAI_API_KEY", id="passthru-mixed"),
    pytest.param({"PORT": "eighty"}, "PORT", id="port-not-int"),
    pytest.param({"PORT": "70000"}, "PORT", id="port-range"),
    pytest.param({"REQUEST_TIMEOUT": "soon"}, "REQUEST_TIMEOUT", id="timeout"),
    pytest.param({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL", id="log-level"),
    pytest.param({"LOG_FORMAT": "xml"}, "LOG_FORMAT", id="log-format"),
    pytest.param({"MAX_RETRIES": "-1"}, "MAX_RETRIES", id="negative"),
    pytest.param({"STREAM_IDLE_TIMEOUT": "nan"}, "STREAM_IDLE_TIMEOUT", id="not-a-number"),
    pytest.param({"REQUEST_TIMEOUT": "inf"}, "REQUEST_TIMEOUT", id="infinite"),
    pytest.param({"STREAM_IDLE_TIMEOUT": "0"}, "STREAM_IDLE_TIMEOUT must be more than 0", id="zero-timeout"),
    pytest.param({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL", id="url"),
    pytest.param({"OPENAI_API_KEY": "k", "OPENAI_ALIAS_A": "b", "OPENAI_ALIAS_B": "a"}, "cycle", id="alias-cycle"),
])
def test_invalid_settings_stop_startup_naming_the_variable(env: dict, fragment: str) -> None:
    with pytest.raises(vd.ConfigError, match=fragment):
        make_config(env)


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "vandamme-config.toml").write_text("[openai]\nbase-url = \n")
    with pytest.raises(vd.ConfigError, match=r"vandamme-config.toml.*line 2"):
        make_config({}, tmp_path)


def test_source_precedence_env_dotenv_local_user_defaults(tmp_path: Path) -> None:
    user = tmp_path / ".config" / "vandamme-proxy"
    user.mkdir(parents=True)
    (user / "vandamme-config.toml").write_text(
        '[defaults]\ndefault-provider = "groq"\n[openai.aliases]\nsonnet = "user-sonnet"\nopus = "user-opus"\n'
        'haiku = "user-haiku"\n[groq]\napi-key = "gk"\n')
    (tmp_path / "vandamme-config.toml").write_text('[openai.aliases]\nsonnet = "local-sonnet"\nopus = "local-opus"\n')
    (tmp_path / ".env").write_text("OPENAI_API_KEY=from-dotenv\nOPENAI_ALIAS_OPUS=dotenv-opus\nPORT=9000\n")
    config = make_config({"OPENAI_API_KEY": "from-env", "PORT": "9100"}, tmp_path)
    assert config.provider("openai").keys == ("from-env",)          # env beats .env
    assert config.port == 9100
    aliases = {(a.provider, a.name): (a.target, a.source) for a in config.aliases}
    assert aliases[("openai", "opus")] == ("dotenv-opus", ".env")
    assert aliases[("openai", "sonnet")] == ("local-sonnet", "local")
    assert aliases[("openai", "haiku")] == ("user-haiku", "user")
    assert config.default_provider == "groq"                         # user TOML default-provider
    assert config.provider("groq").keys == ("gk",)
    env_default = make_config({"OPENAI_API_KEY": "k", "VDM_DEFAULT_PROVIDER": "openai"}, tmp_path)
    assert env_default.default_provider == "openai"


def test_config_flag_replaces_both_toml_locations(tmp_path: Path) -> None:
    (tmp_path / "vandamme-config.toml").write_text('[openai.aliases]\nsonnet = "local"\n')
    other = tmp_path / "other.toml"
    other.write_text('[openai.aliases]\nsonnet = "explicit"\n')
    config = make_config({"OPENAI_API_KEY": "k"}, tmp_path, config_path=str(other))
    assert vd.resolve_model(config, "sonnet").targets == (vd.Target("openai", "explicit"),)
    with pytest.raises(vd.ConfigError, match="no such file"):
        make_config({}, tmp_path, config_path=str(tmp_path / "missing.toml"))


def test_provider_settings_custom_headers_and_api_version() -> None:
    config = make_config({"AZ_API_KEY": "k", "AZ_BASE_URL": "https://r.openai.azure.com",
                          "AZ_API_VERSION": "2024-10-21", "AZ_CUSTOM_HEADER_X_USER_ID": "u1", "ZAI_API_KEY": "z"})
    az = config.provider("az")
    assert az.azure and az.api_version == "2024-10-21" and dict(az.headers) == {"X-USER-ID": "u1"}
    assert config.provider("zai").api_format == "anthropic"


def test_header_variables_go_as_written_even_empty_over_toml(tmp_path: Path) -> None:
    (tmp_path / "vandamme-config.toml").write_text('[openai.headers]\nX-Foo = "from-toml"\nX-Team = "platform"\n')
    config = make_config({"OPENAI_API_KEY": "k", "OPENAI_CUSTOM_HEADER_X_Foo": "", "OPENAI_CUSTOM_HEADER_X_Pad": " v "},
                         tmp_path)
    assert dict(config.provider("openai").headers) == {"X-Foo": "", "X-Pad": " v ", "X-Team": "platform"}


def test_provider_variables_match_in_any_case_global_settings_only_in_capitals() -> None:
    config = make_config({"openai_api_key": "sk-lower-1", "Openai_Custom_Header_X_Team": "t",
                          "openai_alias_fast": "gpt-x", "openai_api_ky": "x", "log_level": "DEBUG"})
    openai = config.provider("openai")
    assert openai.keys == ("sk-lower-1",) and dict(openai.headers) == {"X-Team": "t"}
    assert vd.resolve_model(config, "fast").targets == (vd.Target("openai", "gpt-x"),)
    assert ("openai.keys", vd._mask("sk-lower-1"), "env") in config.sources and config.log_level == "INFO"
    assert "openai_api_ky is not a vandamme setting: did you mean OPENAI_API_KEY?" in config.warnings
    assert "log_level is not a vandamme setting: did you mean LOG_LEVEL?" in config.warnings


def test_provider_without_base_url_only_warns_its_settings_unchecked() -> None:
    broken = {"FOO_API_KEY": "x", "FOO_API_FORMAT": "bogus", "FOO_MAX_TOKENS": "lots", "OPENAI_API_KEY": "k",
              "FOO_CUSTOM_HEADER_X_A": "a\r\nInjected: yes"}
    config = make_config(broken)
    assert config.provider("foo") is None and any(w.startswith("provider 'foo' skipped") for w in config.warnings)
    with pytest.raises(vd.ConfigError, match="FOO_"):           # with a base URL they are checked
        make_config({**broken, "FOO_BASE_URL": "http://127.0.0.1:9/v1"})


def test_default_provider_falls_back_to_first_configured_with_warning() -> None:
    config = make_config({"GROQ_API_KEY": "g", "VDM_DEFAULT_PROVIDER": "openai"})
    assert config.default_provider == "groq"
    assert any("default provider 'openai'" in w for w in config.warnings)


def test_no_provider_still_builds_a_config() -> None:
    config = make_config({})
    assert config.providers == () and config.default_provider is None
    with pytest.raises(vd.VandammeError, match="OPENAI_API_KEY"):
        vd.resolve_model(config, "claude-sonnet-4")


def test_keyless_builtin_is_enabled_when_named() -> None:
    assert make_config({"OPENAI_API_KEY": "k"}).provider("ollama") is None
    config = make_config({"OPENAI_API_KEY": "k", "OLLAMA_ALIAS_CODER": "qwen2.5-coder:7b"})
    assert config.provider("ollama").base_url == "http://localhost:11434/v1"
    assert make_config({"VDM_DEFAULT_PROVIDER": "vllm"}).default_provider == "vllm"


def test_parse_config_is_pure_given_dotenv_and_toml_layers() -> None:
    layers = [("defaults", Path("defaults.toml"), tomllib.loads(vd.defaults_toml())),
              ("local", Path("x.toml"), {"openai": {"aliases": {"sonnet": "mine"}}})]
    config = vd.parse_config({"OPENAI_API_KEY": "k", "PORT": "9100"}, {"PORT": "9000", "LOG_LEVEL": "debug"}, layers)
    assert (config.port, config.log_level) == (9100, "DEBUG")
    assert ("LOG_LEVEL", "DEBUG", ".env") in config.sources and ("PORT", "9100", "env") in config.sources
    assert vd.resolve_model(config, "sonnet").targets == (vd.Target("openai", "mine"),)


def test_config_repr_never_shows_keys() -> None:
    config = make_config({"OPENAI_API_KEY": "sk-secret-value-123456", "PROXY_API_KEY": "proxy-secret-987654"})
    assert "sk-secret-value-123456" not in repr(config)
    assert "proxy-secret-987654" not in repr(config)


# ---------------------------------------------------------------------------
# §4 Routing and aliases
# ---------------------------------------------------------------------------

ROUTING_ENV = {"OPENAI_API_KEY": "k", "OPENROUTER_API_KEY": "k", "OLLAMA_BASE_URL": "http://127.0.0.1:1/v1",
               "OPENAI_ALIAS_FAST": "gpt-fast", "OPENAI_ALIAS_FASTER": "gpt-faster",
               "OPENROUTER_ALIAS_FAST": "or-fast", "OPENROUTER_ALIAS_CHEAP": "qwen/qwen3:free",
               "OPENAI_ALIAS_MY_MODEL": "my-target", "OPENAI_ALIAS_CHAIN": "fast",
               "OPENAI_ALIAS_CROSS": "openrouter:cheap", "OPENAI_ALIAS_FB": "gpt-5,openrouter:openai/gpt-5",
               "OPENAI_ALIAS_LIT": "!fast"}


@pytest.mark.parametrize(("model", "expected"), [
    pytest.param("gpt-4o", [("openai", "gpt-4o")], id="unaliased-goes-to-default"),
    pytest.param("openrouter:anthropic/claude", [("openrouter", "anthropic/claude")], id="prefix"),
    pytest.param("OpenRouter:x", [("openrouter", "x")], id="prefix-case-insensitive"),
    pytest.param("qwen2.5-coder:7b", [("openai", "qwen2.5-coder:7b")], id="colon-not-a-provider"),
    pytest.param("fast", [("openai", "gpt-fast")], id="exact-default-provider-wins-tie"),
    pytest.param("FAST", [("openai", "gpt-fast")], id="case-insensitive"),
    pytest.param("my-faster-thing", [("openai", "gpt-faster")], id="longest-substring"),
    pytest.param("claude-fast-4", [("openai", "gpt-fast")], id="substring"),
    pytest.param("my_model", [("openai", "my-target")], id="underscore-equals-dash"),
    pytest.param("cheap", [("openrouter", "qwen/qwen3:free")], id="other-provider-alias"),
    pytest.param("openrouter:fast", [("openrouter", "or-fast")], id="prefixed-exact-alias"),
    pytest.param("openrouter:breakfast", [("openrouter", "breakfast")], id="prefixed-no-substring"),
    pytest.param("chain", [("openai", "gpt-fast")], id="chain"),
    pytest.param("cross", [("openrouter", "qwen/qwen3:free")], id="cross-provider-chain"),
    pytest.param("fb", [("openai", "gpt-5"), ("openrouter", "openai/gpt-5")], id="fallback-list"),
    pytest.param("lit", [("openai", "fast")], id="literal-target"),
    pytest.param("!fast", [("openai", "fast")], id="bang-bypasses-aliases"),
    pytest.param("!openrouter:fast", [("openrouter", "fast")], id="bang-with-provider"),
    pytest.param("claude-sonnet-4-5-20250929", [("openai", "gpt-5.1")], id="claude-name-default-alias"),
    pytest.param("claude-haiku-4-5", [("openai", "gpt-5-mini")], id="haiku-default-alias"),
    pytest.param("ollama:sonnet", [("ollama", "qwen3-coder:30b")], id="builtin-alias-on-prefixed"),
])
def test_resolve_model(model: str, expected: list) -> None:
    route = vd.resolve_model(make_config(ROUTING_ENV), model)
    assert [(t.provider, t.model) for t in route.targets] == expected
    assert route.rule


def test_alias_precedence_env_over_defaults() -> None:
    config = make_config({"OPENAI_API_KEY": "k", "OPENAI_ALIAS_SONNET": "mine"})
    assert vd.resolve_model(config, "claude-sonnet-4").targets == (vd.Target("openai", "mine"),)
    assert {a.name: a.source for a in config.aliases}["sonnet"] == "env"


def test_alias_chain_limit_and_cycle_detection() -> None:
    env = {"OPENAI_API_KEY": "k", **{f"OPENAI_ALIAS_A{i}": f"a{i + 1}" for i in range(12)}}
    with pytest.raises(vd.ConfigError, match="too long"):
        make_config(env)
    with pytest.raises(vd.ConfigError, match="cycle"):
        make_config({"OPENAI_API_KEY": "k", "OPENAI_ALIAS_X": "y", "OPENAI_ALIAS_Y": "openai:z",
                     "OPENAI_ALIAS_Z": "x"})


def test_model_name_never_selects_an_unconfigured_url() -> None:
    config = make_config({"OPENAI_API_KEY": "k"})
    for model in ("http://evil.example/v1:gpt", "https://127.0.0.1:1", "evil:model"):
        route = vd.resolve_model(config, model)
        assert route.targets[0].provider == "openai"


# ---------------------------------------------------------------------------
# §5 API-key rotation
# ---------------------------------------------------------------------------

def test_keyring_round_robin_and_cooldown() -> None:
    now = [100.0]
    ring = vd.KeyRing(["a", "b", "c"], clock=lambda: now[0])
    assert [ring.order()[0] for _ in range(4)] == ["a", "b", "c", "a"]
    ring.cool("b", 60)
    assert ring.order() == ["c", "a"]       # b's turn comes up, but b is cooling: skipped, rotation kept
    assert ring.order() == ["c", "a"]
    assert ring.cooling() == 1
    now[0] += 61
    assert "b" in ring.order() and ring.cooling() == 0
    for key in "abc":
        ring.cool(key, {"a": 30, "b": 10, "c": 20}[key])
    assert ring.order() == ["b"]           # all cooling: only the soonest one is tried


# ---------------------------------------------------------------------------
# §6 Request conversion: Anthropic -> OpenAI
# ---------------------------------------------------------------------------

OPENAI = vd.Provider(name="openai", base_url="http://x")


def convert(body: dict, provider: vd.Provider = OPENAI, model: str = "gpt-4o", **kw: Any) -> dict:
    payload, _conv = vd.anthropic_to_openai({"max_tokens": 50, **body}, provider, model, **kw)
    return payload


def msgs(*messages: Any) -> dict:
    return {"messages": list(messages)}


def user(content: Any) -> dict:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict:
    return {"role": "assistant", "content": content}


TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
TOOL_USE_2 = {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"file_path": "/x"}}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
# the same three as the OpenAI side sends them
BASH_CALL = {"id": "toolu_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}
READ_CALL = {"id": "toolu_2", "type": "function", "function": {"name": "Read", "arguments": '{"file_path": "/x"}'}}
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}


@pytest.mark.parametrize(("body", "expected_messages"), [
    pytest.param({"system": "Be brief.", **msgs(user("Hi"))},
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], id="system-string"),
    pytest.param({"system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                             {"type": "text", "text": "B"}], **msgs(user("Hi"))},
                 [{"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "Hi"}], id="system-blocks"),
    pytest.param(msgs(user("Hi"), {"role": "system", "content": [{"type": "text", "text": "Env"}]},
                      {"role": "system", "content": []}, {"role": "system", "content": ""}),
                 [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Env"}],
                 id="system-role-in-messages"),
    pytest.param(msgs(user([{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                            {"type": "text", "text": ""}])),
                 [{"role": "user", "content": "a"}], id="empty-text-dropped-single-text-flattened"),
    pytest.param(msgs(user([{"type": "text", "text": "look"}, IMAGE,
                            {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}}])),
                 [{"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE_URL,
                                               {"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}],
                 id="images"),
    pytest.param(msgs(user([{"type": "document", "title": "spec.pdf",
                             "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
                            {"type": "document",
                             "source": {"type": "text", "media_type": "text/plain", "data": "plain"}}])),
                 [{"role": "user", "content": [
                     {"type": "file",
                      "file": {"filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
                     {"type": "text", "text": "plain"}]}], id="documents"),
    pytest.param(msgs(user("run"), assistant([{"type": "text", "text": "ok"}, TOOL_USE]),
                      user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "file.txt"}])),
                 [{"role": "user", "content": "run"},
                  {"role": "assistant", "content": "ok", "tool_calls": [BASH_CALL]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "file.txt"}], id="tool-round-trip"),
    pytest.param(msgs(assistant([TOOL_USE, TOOL_USE_2]),
                      user([{"type": "tool_result", "tool_use_id": "toolu_2",
                             "content": [{"type": "text", "text": "r2"}]},
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "r1", "is_error": True},
                            {"type": "text", "text": "<system-reminder>x</system-reminder>"}])),
                 [{"role": "assistant", "content": None, "tool_calls": [BASH_CALL, READ_CALL]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: r1"},
                  {"role": "tool", "tool_call_id": "toolu_2", "content": "r2"},
                  {"role": "user", "content": "<system-reminder>x</system-reminder>"}],
                 id="results-reordered-error-visible-text-after"),
    pytest.param(msgs(assistant([TOOL_USE]), user([{"type": "tool_result", "tool_use_id": "toolu_1",
                                                     "content": [{"type": "text", "text": "shot"}, IMAGE]}])),
                 [{"role": "assistant", "content": None, "tool_calls": [BASH_CALL]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "shot\n[image attached below]"},
                  {"role": "user", "content": [{"type": "text", "text": "Attachments from the tool results above:"},
                                               IMAGE_URL]}],
                 id="tool-result-image-follows"),
    pytest.param(msgs(assistant([{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                 {"type": "redacted_thinking", "data": "x"}, {"type": "text", "text": "done"}])),
                 [{"role": "assistant", "content": "done"}], id="thinking-removed"),
    pytest.param(msgs(user([{"type": "weird_future_block", "x": 1}, {"type": "text", "text": "hi"}])),
                 [{"role": "user", "content": "hi"}], id="unknown-block-dropped"),
    pytest.param(msgs(assistant([TOOL_USE]), user("next")),
                 [{"role": "assistant", "content": None, "tool_calls": [BASH_CALL]},
                  {"role": "tool", "tool_call_id": "toolu_1", "content": "Tool call was interrupted; no result."},
                  {"role": "user", "content": "next"}], id="unanswered-call-repaired"),
    pytest.param(msgs(user([{"type": "tool_result", "tool_use_id": "ghost", "content": "late"}])),
                 [{"role": "user", "content": "[result of tool call ghost]\nlate"}], id="orphan-result-kept-as-text"),
])
def test_request_messages(body: dict, expected_messages: list) -> None:
    assert convert(body)["messages"] == expected_messages


@pytest.mark.parametrize(("body", "model", "expected"), [
    pytest.param({"stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 5,
                  "metadata": {"user_id": "u"}, "context_management": {}, "output_config": {"effort": "high"},
                  "safeguards": {}}, "gpt-4o",
                 {"stop": ["END"], "temperature": 0.2, "top_p": 0.9, "max_tokens": 50}, id="sampling"),
    pytest.param({"temperature": 0.2}, "o3-mini", {"max_completion_tokens": 50}, id="reasoning-model-field"),
    pytest.param({}, "gpt-5.1-codex", {"max_completion_tokens": 50}, id="gpt5-family"),
    pytest.param({"stream": True}, "gpt-4o", {"stream": True, "stream_options": {"include_usage": True},
                                              "max_tokens": 50}, id="stream-usage"),
])
def test_request_top_level_fields(body: dict, model: str, expected: dict) -> None:
    payload = convert({**body, **msgs(user("x"))}, model=model)
    payload.pop("messages")
    payload.pop("model")
    assert payload == expected


def test_max_tokens_clamped_and_field_from_provider() -> None:
    assert convert(msgs(user("x")), max_tokens_limit=10)["max_tokens"] == 10
    local = vd.Provider(name="l", base_url="http://x", max_tokens_field="max_completion_tokens", stream_usage=False)
    payload = convert({"stream": True, **msgs(user("x"))}, local)
    assert payload["max_completion_tokens"] == 50 and "stream_options" not in payload


BASH_TOOL = {"name": "Bash", "description": "Run",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}


@pytest.mark.parametrize(("tools", "choice", "expected_choice", "parallel"), [
    pytest.param([BASH_TOOL], {"type": "auto"}, "auto", None, id="auto"),
    pytest.param([BASH_TOOL], {"type": "any"}, "required", None, id="any-required"),
    pytest.param([BASH_TOOL], {"type": "none"}, "none", None, id="none"),
    pytest.param([BASH_TOOL], {"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}},
                 None, id="named"),
    pytest.param([BASH_TOOL], {"type": "auto", "disable_parallel_tool_use": True}, "auto", False, id="no-parallel"),
    pytest.param([{"type": "web_search_20250305", "name": "web_search"}], {"type": "tool", "name": "web_search"},
                 None, None, id="server-tool-only"),
])
def test_tools_and_tool_choice(tools: list, choice: dict, expected_choice: Any, parallel: Any) -> None:
    payload = convert({"tools": tools, "tool_choice": choice, **msgs(user("x"))})
    assert payload.get("tool_choice") == expected_choice
    assert payload.get("parallel_tool_calls") == parallel
    if expected_choice is None:
        assert "tools" not in payload
    else:
        assert payload["tools"] == [{"type": "function", "function": {
            "name": "Bash", "description": "Run", "parameters": BASH_TOOL["input_schema"]}}]


def test_long_and_invalid_tool_names_are_shortened_and_mapped_back() -> None:
    long_name = "mcp__" + "very_long_server_name__" * 4 + "tool"
    odd = "get weather.now"
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in (long_name, odd)]
    payload, conv = vd.anthropic_to_openai({"tools": tools, **msgs(user("x"))}, OPENAI, "gpt-4o")
    names = [t["function"]["name"] for t in payload["tools"]]
    assert all(len(n) <= 64 and re.fullmatch(r"[a-zA-Z0-9_-]+", n) for n in names)
    assert names[0] == vd._tool_name_for_upstream(long_name)        # deterministic
    reply = completion(None, tool_calls=[{"id": "c1", "type": "function",
                                          "function": {"name": names[1], "arguments": "{}"}}],
                       finish_reason="tool_calls")
    assert vd.openai_to_anthropic(reply, conv, "m")["content"][0]["name"] == odd


def test_thinking_to_reasoning_effort_only_where_accepted() -> None:
    reasoning = vd.Provider(name="o", base_url="http://x", reasoning_effort="reasoning-models")
    body = {"thinking": {"type": "enabled", "budget_tokens": 31999}, **msgs(user("x"))}
    assert convert(body, reasoning, "o3")["reasoning_effort"] == "high"
    assert "reasoning_effort" not in convert(body, reasoning, "gpt-4o")
    assert "reasoning_effort" not in convert(body, OPENAI, "o3")
    adaptive = {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}, **msgs(user("x"))}
    assert convert(adaptive, reasoning, "gpt-5")["reasoning_effort"] == "low"


def test_mistral_tool_ids_are_nine_alphanumerics_both_ways() -> None:
    mistral = vd.Provider(name="mistral", base_url="http://x", tool_id_format="mistral")
    payload = convert(msgs(assistant([TOOL_USE]), user([{"type": "tool_result", "tool_use_id": "toolu_1",
                                                         "content": "ok"}])), mistral)
    call_id = payload["messages"][0]["tool_calls"][0]["id"]
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", call_id) and payload["messages"][1]["tool_call_id"] == call_id


@pytest.mark.parametrize(("body", "fragment"), [
    pytest.param({"messages": "hi"}, "messages", id="messages-not-list"),
    pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", id="bad-role"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", id="content-type"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                 "messages.0.content.0.text", id="text-type"),
    pytest.param({"messages": [], "tools": [{"name": 3}]}, "tools.0.name", id="tool-name"),
    pytest.param({"messages": [], "tools": [BASH_TOOL], "tool_choice": {"type": "sometimes"}}, "tool_choice",
                 id="tool-choice"),
    pytest.param({"messages": [], "max_tokens": "many"}, "max_tokens", id="max-tokens"),
    pytest.param({"messages": [], "temperature": "hot"}, "temperature", id="temperature"),
])
def test_client_mistakes_are_400_naming_the_field(body: dict, fragment: str) -> None:
    with pytest.raises(vd.InvalidRequestError, match=re.escape(fragment)):
        vd.anthropic_to_openai(body, OPENAI, "gpt-4o")


@pytest.mark.parametrize("path", FIXTURE_PARAMS)
def test_claude_code_fixtures_convert(path: Path) -> None:
    body = json.loads(path.read_text())
    payload, _conv = vd.anthropic_to_openai(body, OPENAI, "gpt-4o")
    text = json.dumps(payload)
    assert "cache_control" not in text and "context_management" not in text and "output_config" not in text
    roles = [m["role"] for m in payload["messages"]]
    assert roles[0] == "system" and set(roles) <= {"system", "user", "assistant", "tool"}
    assert not any(m.get("content") in ("", []) and not m.get("tool_calls") for m in payload["messages"])
    for tool in payload.get("tools", ()):
        assert len(tool["function"]["name"]) <= 64 and tool["function"]["parameters"]["type"] == "object"
    # every tool call is answered right after its assistant turn, in call order
    for i, message in enumerate(payload["messages"]):
        ids = [c["id"] for c in message.get("tool_calls") or ()]
        if ids:
            following = [m["tool_call_id"] for m in payload["messages"][i + 1: i + 1 + len(ids)]]
            assert following == ids
    if "parallel" in path.name:
        tool_msgs = [m for m in payload["messages"] if m["role"] == "tool"]
        assert len(tool_msgs) == 2
    if body.get("stream"):
        assert payload["stream_options"] == {"include_usage": True}
    assert payload["max_tokens"] == body["max_tokens"]
    assert vd.count_request_tokens(body) > 1000


def test_largest_fixture_converts_quickly() -> None:
    """Guards against accidental quadratic work; the real figure comes from bench/run.py."""
    if not ALL_FIXTURES:
        pytest.skip(NEEDS_FIXTURES)
    body = json.loads(max(ALL_FIXTURES, key=lambda p: p.stat().st_size).read_text())
    started = time.perf_counter()
    for _ in range(20):
        vd.anthropic_to_openai(body, OPENAI, "gpt-4o")
    assert (time.perf_counter() - started) / 20 < 0.05


# ---------------------------------------------------------------------------
# §7 Response conversion: OpenAI -> Anthropic
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("reply", "content", "stop_reason"), [
    pytest.param(completion("Hi"), [{"type": "text", "text": "Hi"}], "end_turn", id="text"),
    pytest.param(completion("cut", finish_reason="length"), [{"type": "text", "text": "cut"}], "max_tokens",
                 id="length"),
    pytest.param(completion(None, finish_reason="content_filter"), [{"type": "text", "text": ""}], "refusal",
                 id="content-filter-empty"),
    pytest.param(completion("ok", reasoning_content="think"), [
        {"type": "thinking", "thinking": "think", "signature": vd._thinking_signature("think")},
        {"type": "text", "text": "ok"}], "end_turn", id="reasoning-content-first"),
    pytest.param(completion("ok", reasoning="vllm style"), [
        {"type": "thinking", "thinking": "vllm style", "signature": vd._thinking_signature("vllm style")},
        {"type": "text", "text": "ok"}], "end_turn", id="reasoning-field"),
    pytest.param(completion("Let me", tool_calls=[{"id": "call_1", "type": "function", "function": {
        "name": "Bash", "arguments": '{"command":"ls"}'}}], finish_reason="stop"),
        [{"type": "text", "text": "Let me"}, {"type": "tool_use", "id": "call_1", "name": "Bash",
                                             "input": {"command": "ls"}}], "tool_use", id="stop-with-tools"),
    pytest.param(completion(None, tool_calls=[{"id": "c", "type": "function", "function": {
        "name": "F", "arguments": '{"a": 1 "b"}'}}], finish_reason="tool_calls"),
        [{"type": "tool_use", "id": "c", "name": "F", "input": {"_raw_arguments": '{"a": 1 "b"}'}}], "tool_use",
        id="bad-json-kept-raw"),
    pytest.param(completion(None, refusal="no"), [{"type": "text", "text": "no"}], "refusal", id="refusal"),
])
def test_response_conversion(reply: dict, content: list, stop_reason: str) -> None:
    message = vd.openai_to_anthropic(reply, vd.Conversion(), "claude-x")
    assert message["content"] == content and message["stop_reason"] == stop_reason
    assert message["model"] == "claude-x" and message["id"].startswith("msg_") and message["type"] == "message"


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param('{"a": 1}', {"a": 1}, id="valid"),
    pytest.param("", {}, id="empty"),
    pytest.param('"{\\"a\\": 2}"', {"a": 2}, id="double-encoded"),
    pytest.param('```json\n{"a": 3}\n```', {"a": 3}, id="fenced"),
    pytest.param('{"a": [1, 2,],}', {"a": [1, 2]}, id="trailing-commas"),
    pytest.param('{"cmd": "echo \\"hi', {"cmd": 'echo "hi'}, id="truncated-string"),
    pytest.param('{"a": {"b": ', {"a": {"b": None}}, id="truncated-value"),
    pytest.param('{"a": 1, ', {"a": 1}, id="truncated-after-comma"),
    pytest.param("not json at all", {"_raw_arguments": "not json at all"}, id="garbage"),
    pytest.param("[1, 2]", {"_raw_arguments": "[1, 2]"}, id="array"),
    pytest.param('{"text": "line 1\nline 2"}', {"text": "line 1\nline 2"}, id="raw-newline-in-string"),
])
def test_parse_tool_arguments(raw: str, expected: dict) -> None:
    assert vd.parse_tool_arguments(raw) == expected


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param('{"a": [1, {"b": "x\\"y"}], "c": true}', {"a": [1, {"b": 'x"y'}], "c": True}, id="complete"),
    pytest.param('{"cmd": "echo \\"hi', {"cmd": 'echo "hi'}, id="open-string"),
    pytest.param('{"a": {"b": ', {"a": {"b": None}}, id="open-value"),
    pytest.param('{"a": 1, ', {"a": 1}, id="held-comma"),
    pytest.param('{"a": fa', {"a": False}, id="partial-literal"),
    pytest.param('{"n": 1e', {"n": 1.0}, id="partial-number"),
    pytest.param('{"k"', {"k": None}, id="open-key"),
    pytest.param('"double encoded"', {}, id="not-an-object"),
    pytest.param('{"a"{"x": 1}', {}, id="broken"),
    pytest.param('{"n": 01}', {}, id="leading-zero"),
    pytest.param('{"n": 1.e5}', {}, id="dot-then-exponent"),
    pytest.param('{"n": \u0661}', {}, id="non-ascii-digit"),
    pytest.param('{"a": "x\\q"}', {}, id="unknown-escape"),
    pytest.param('{"a": "x\\u12g4"}', {}, id="bad-unicode-escape"),
    pytest.param('{"a": "x\ny"}', {"a": "x\ny"}, id="raw-newline-in-string-escaped"),
    pytest.param('{"a\tb": 1}', {"a\tb": 1}, id="raw-tab-in-key-escaped"),
    pytest.param('{"a": "\\u00e9\\n\\/\\u12', {"a": "é\n/\u1200"}, id="open-unicode-escape"),
])
def test_json_prefix_closes_any_viable_prefix_at_every_split(text: str, expected: dict) -> None:
    for cut in range(len(text) + 1):
        checker, sent = vd.JsonPrefix(), ""
        for part in (text[:cut], text[cut:]):
            piece = checker.feed(part)
            if piece is None:
                break
            sent += piece
        result = json.loads(sent + checker.suffix())
        assert isinstance(result, dict)
        if cut in (0, len(text)):
            assert result == expected, cut


def test_usage_is_net_of_cache() -> None:
    usage = vd.usage_to_anthropic({"prompt_tokens": 100, "completion_tokens": 9,
                                   "prompt_tokens_details": {"cached_tokens": 60}})
    assert usage == {"input_tokens": 40, "output_tokens": 9, "cache_read_input_tokens": 60,
                     "cache_creation_input_tokens": 0}


# ---------------------------------------------------------------------------
# §8 Streaming: SSE decoder and stream translator
# ---------------------------------------------------------------------------

SSE_SAMPLE = ("event: first\r\ndata: {\"a\": \"héllo wörld 日本\"}\r\n\r\n: comment line\n"
              "stray line\ndata: {\"b\":\ndata: 2}\n\ndata: [DONE]\n\n").encode()


def test_sse_decoder_same_events_at_every_split() -> None:
    whole = vd.SSEDecoder().feed(SSE_SAMPLE)
    assert whole == [("first", '{"a": "héllo wörld 日本"}'.encode()), ("message", b'{"b":\n2}'),
                     ("message", b"[DONE]")]
    for i in range(len(SSE_SAMPLE) + 1):
        decoder = vd.SSEDecoder()
        assert decoder.feed(SSE_SAMPLE[:i]) + decoder.feed(SSE_SAMPLE[i:]) + decoder.close() == whole, i
    decoder = vd.SSEDecoder()
    assert [e for b in SSE_SAMPLE for e in decoder.feed(bytes([b]))] == whole


def test_sse_decoder_flushes_unterminated_event() -> None:
    decoder = vd.SSEDecoder()
    assert decoder.feed(b'data: {"x":1}') == []
    assert decoder.close() == [("message", b'{"x":1}')]


def translate(*chunks: Any, conv: vd.Conversion | None = None) -> list[tuple[str, dict]]:
    translator = vd.StreamTranslator("claude-x", conv, input_tokens=42)
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
    events += translator.finish()
    text = vd.encode_events(events).decode()
    return validate_stream(text)


def tc(index: Any = 0, id: Any = None, name: Any = None, args: Any = None) -> dict:
    call: dict[str, Any] = {"function": {}}
    if index is not None:
        call["index"] = index
    if id is not None:
        call["id"], call["type"] = id, "function"
    if name is not None:
        call["function"]["name"] = name
    if args is not None:
        call["function"]["arguments"] = args
    return call


def blocks(frames: list[tuple[str, dict]]) -> list[dict]:
    return final_message(frames)["content"]


STREAM_CASES = [
    pytest.param([delta(role="assistant", content=""), delta(content="Hel"), delta(content="lo"), finish()],
                 [{"type": "text", "text": "Hello"}], "end_turn", id="text"),
    pytest.param([delta(content="no role first"), finish()], [{"type": "text", "text": "no role first"}], "end_turn",
                 id="first-chunk-without-role"),
    pytest.param([delta(reasoning_content="think "), delta(reasoning_content="more"), delta(content="answer"),
                  finish()],
                 [{"type": "thinking", "thinking": "think more"}, {"type": "text", "text": "answer"}], "end_turn",
                 id="reasoning-then-text"),
    pytest.param([delta(reasoning="vllm"), delta(content="x"), finish()],
                 [{"type": "thinking", "thinking": "vllm"}, {"type": "text", "text": "x"}], "end_turn",
                 id="reasoning-field"),
    pytest.param([delta(content="Run"), delta(tool_calls=[tc(0, "c1", "Bash", "")]),
                  delta(tool_calls=[tc(0, args='{"comm')]), delta(tool_calls=[tc(0, args='and": "ls"}')]),
                  finish("tool_calls")],
                 [{"type": "text", "text": "Run"}, {"type": "tool_use", "id": "c1", "name": "Bash",
                                                    "input": {"command": "ls"}}], "tool_use", id="text-then-tool"),
    pytest.param([delta(tool_calls=[tc(0, "c1", "A", '{"x": 1}'), tc(1, "c2", "B", '{"y": 2}')]), finish("tool_calls")],
                 [{"type": "tool_use", "id": "c1", "name": "A", "input": {"x": 1}},
                  {"type": "tool_use", "id": "c2", "name": "B", "input": {"y": 2}}], "tool_use",
                 id="two-whole-calls-one-chunk"),
    pytest.param([delta(tool_calls=[tc(0, "c1", "A", '{"x"')]), delta(tool_calls=[tc(1, "c2", "B", '{"y"')]),
                  delta(tool_calls=[tc(0, args=': 1}')]), delta(tool_calls=[tc(1, args=': 2}')]), finish("tool_calls")],
                 [{"type": "tool_use", "id": "c1", "name": "A", "input": {"x": 1}},
                  {"type": "tool_use", "id": "c2", "name": "B", "input": {"y": 2}}], "tool_use",
                 id="interleaved-parallel-calls"),
    pytest.param([delta(tool_calls=[tc(None, "c1", "A", '{"x":')]), delta(tool_calls=[tc(None, args=" 1}")]),
                  delta(tool_calls=[tc(None, "c2", "B", "{}")]), finish("tool_calls")],
                 [{"type": "tool_use", "id": "c1", "name": "A", "input": {"x": 1}},
                  {"type": "tool_use", "id": "c2", "name": "B", "input": {}}], "tool_use", id="no-index"),
    pytest.param([delta(tool_calls=[tc(0, "c1", "A", '{"q": "a"')]),
                  delta(tool_calls=[tc(0, "c1", "A", '{"q": "a", "r": 1}')]), finish("tool_calls")],
                 [{"type": "tool_use", "id": "c1", "name": "A", "input": {"q": "a", "r": 1}}], "tool_use",
                 id="cumulative-snapshots-and-repeated-id"),
    pytest.param([delta(tool_calls=[tc(0, "g1", "A", "{}")]), delta(tool_calls=[tc(0, "g2", "B", "{}")]),
                  finish("stop")],
                 [{"type": "tool_use", "id": "g1", "name": "A", "input": {}},
                  {"type": "tool_use", "id": "g2", "name": "B", "input": {}}], "tool_use",
                 id="index-reused-stop-means-tool-use"),
    pytest.param([delta(tool_calls=[tc(0, args='{"a": 1}')]), delta(tool_calls=[tc(0, "late", "L")]),
                  finish("tool_calls")],
                 [{"type": "tool_use", "id": "late", "name": "L", "input": {"a": 1}}], "tool_use",
                 id="arguments-before-name"),
    pytest.param([delta(tool_calls=[tc(0, "c1", "A", '{"cmd": "echo')]), finish("length")],
                 [{"type": "tool_use", "id": "c1", "name": "A", "input": {"cmd": "echo"}}], "tool_use",
                 id="truncated-arguments-completed"),
    pytest.param([{"choices": []}, {}, {"choices": [{"index": 0}]}, delta(content="x"), finish("length")],
                 [{"type": "text", "text": "x"}], "max_tokens", id="empty-chunks"),
    pytest.param([delta(content="a", finish_reason="stop"), usage_chunk()], [{"type": "text", "text": "a"}], "end_turn",
                 id="finish-in-content-chunk"),
    pytest.param([], [{"type": "text", "text": ""}], "end_turn", id="no-chunks-at-all"),
    pytest.param(["garbage", 42, {"choices": "x"}, {"choices": [{"delta": {"content": 5, "tool_calls": "no"}}]},
                  {"choices": [{"delta": {"tool_calls": [7, {"index": "x", "function": "f"}]}}]}, delta(content="ok")],
                 [{"type": "text", "text": "ok"}], "end_turn", id="wrong-types-ignored"),
    pytest.param([delta(content="x"), {"choices": [{"index": 1, "delta": {"content": "other choice"}}]}],
                 [{"type": "text", "text": "x"}], "end_turn", id="second-choice-ignored"),
    pytest.param([delta(role="assistant", content=None, refusal="I can't"), delta(refusal=" help."), finish("stop")],
                 [{"type": "text", "text": "I can't help."}], "refusal", id="refusal"),
]


@pytest.mark.parametrize(("chunks", "expected", "stop_reason"), STREAM_CASES)
def test_stream_translator(chunks: list, expected: list, stop_reason: str) -> None:
    frames = translate(*chunks)
    content = blocks(frames)
    for block in content:
        block.pop("signature", None)
    assert content == expected
    message_delta = next(d for n, d in frames if n == "message_delta")
    assert message_delta["delta"]["stop_reason"] == stop_reason
    assert frames[0][1]["message"]["usage"]["input_tokens"] == 42
    assert frames[1][0] == "ping"


def test_stream_usage_from_upstream_usage_chunk() -> None:
    frames = translate(delta(content="x"), finish(), usage_chunk(100, 9, cached=30))
    usage = next(d for n, d in frames if n == "message_delta")["usage"]
    assert usage == {"input_tokens": 70, "output_tokens": 9, "cache_read_input_tokens": 30,
                     "cache_creation_input_tokens": 0}


def test_stream_thinking_block_gets_signature_delta() -> None:
    frames = translate(delta(reasoning_content="r"), delta(content="t"))
    kinds = [d["delta"]["type"] for n, d in frames if n == "content_block_delta"]
    assert kinds == ["thinking_delta", "signature_delta", "text_delta"]


def test_stream_in_band_error_raises() -> None:
    translator = vd.StreamTranslator("m")
    translator.start()
    with pytest.raises(vd.UpstreamError, match="quota"):
        translator.feed({"error": {"message": "quota exceeded"}})
    with pytest.raises(vd.UpstreamError, match="boom"):
        vd.StreamTranslator("m").feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "error",
                                                    "error": {"message": "boom"}}]})


def test_stream_tool_names_mapped_back() -> None:
    conv = vd.Conversion(tool_names={"get_weather_1a2b3c4d": "get weather"})
    frames = translate(delta(tool_calls=[tc(0, "c", "get_weather_1a2b3c4d", "{}")]), conv=conv)
    assert blocks(frames)[0]["name"] == "get weather"


def test_message_events_replay_a_whole_message() -> None:
    reply = completion("Hi", reasoning_content="r", refusal="no", tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}])
    message = vd.openai_to_anthropic(reply, vd.Conversion(), "claude-x")
    replayed = final_message(validate_stream(vd.encode_events(vd.message_events(message)).decode()))
    assert replayed["content"] == message["content"] and len(message["content"]) == 4
    assert replayed["stop_reason"] == "tool_use" and replayed["usage"] == message["usage"]


def test_sse_decoder_keeps_a_long_line_as_pieces_until_its_newline() -> None:
    piece, count = b"x" * 65536, 640                      # a 40 MiB line without a newline
    decoder = vd.SSEDecoder()
    assert decoder.feed(b"data: ") == []
    for _ in range(count):
        assert decoder.feed(piece) == []
    assert len(decoder._pending) == count + 1             # held as fed: nothing re-joined per chunk
    assert sum(len(p) for p in decoder._pending) == 6 + count * len(piece)
    [(name, data)] = decoder.feed(b"\n\n")
    assert name == "message" and len(data) == count * len(piece) and decoder._pending == []


@pytest.mark.parametrize(("parts", "fails_at"), [
    pytest.param([b"data: " + b"x" * 994, b"\n\n"], None, id="line-at-limit"),
    pytest.param([b"data: " + b"x" * 994, b"y"], 1, id="line-over-limit-in-pieces"),
    pytest.param([b"data: " + b"x" * 1001 + b"\n"], 0, id="data-over-limit-in-one-chunk"),
    pytest.param([b"data: " + b"x" * 600 + b"\n\n", b"data: " + b"x" * 600 + b"\n\n"], None, id="events-under-limit"),
    pytest.param([b"data: " + b"x" * 600 + b"\n", b"data: " + b"x" * 600 + b"\n"], 1, id="event-over-limit"),
])
def test_sse_decoder_limits_line_and_event_size(parts: list, fails_at: int | None) -> None:
    decoder = vd.SSEDecoder(max_event_bytes=1000)
    for i, part in enumerate(parts):
        if i == fails_at:
            with pytest.raises(vd.SSETooLarge):
                decoder.feed(part)
            return
        decoder.feed(part)
    assert fails_at is None and decoder.close() == []


# ---------------------------------------------------------------------------
# §8 Responses API providers (api-format = "responses"): conversion, streams, end to end; tool-id fidelity
# ---------------------------------------------------------------------------

RESPONSES = vd.Provider(name="rs", base_url="http://x", api_format="responses", reasoning_effort="always")
SIGNED = vd._REASONING_MARK + vd._b64(json.dumps(["rs:gpt-5-codex", "rs_1", "gAAAA-enc-1"]))
OTHER_MODEL = vd._REASONING_MARK + vd._b64(json.dumps(["rs:gpt-5.1", "rs_9", "gAAAA-other"]))
KIMI_ID = "functions.get_weather:0"
REPLAYED = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "plan"}],
            "encrypted_content": "gAAAA-enc-1"}


def to_responses(body: dict, model: str = "gpt-5-codex", **kw: Any) -> dict:
    payload, _conv = vd.anthropic_to_responses({"max_tokens": 50, **body}, RESPONSES, model, **kw)
    assert responses_rejection(payload) is None, (responses_rejection(payload), payload)
    return payload


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param({"system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], **msgs(user("hi"))},
                 {"instructions": "A\n\nB", "input": [{"role": "user", "content": "hi"}]}, id="system-instructions"),
    pytest.param(msgs(user([{"type": "text", "text": "see"}, IMAGE,
                            {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}},
                            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                            "data": "JVBE"}}])),
                 {"input": [{"role": "user", "content": [
                     {"type": "input_text", "text": "see"},
                     {"type": "input_image", "image_url": "data:image/png;base64,iVBOR", "detail": "auto"},
                     {"type": "input_image", "image_url": "https://x/i.png", "detail": "auto"},
                     {"type": "input_file", "filename": "document.pdf",
                      "file_data": "data:application/pdf;base64,JVBE"}]}]}, id="parts"),
    pytest.param(msgs(user("go"), assistant([{"type": "text", "text": "Two."}, TOOL_USE, TOOL_USE_2]),
                      user([{"type": "tool_result", "tool_use_id": "toolu_2", "content": "read", "is_error": True},
                            {"type": "tool_result", "tool_use_id": "toolu_1",
                             "content": [{"type": "text", "text": "shot"}, IMAGE]},
                            {"type": "text", "text": "then?"}])),
                 {"input": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "Two."},
                            {"type": "function_call", "call_id": "toolu_1", "name": "Bash",
                             "arguments": '{"command": "ls"}'},
                            {"type": "function_call", "call_id": "toolu_2", "name": "Read",
                             "arguments": '{"file_path": "/x"}'},
                            {"type": "function_call_output", "call_id": "toolu_1",
                             "output": "shot\n[image attached below]"},
                            {"type": "function_call_output", "call_id": "toolu_2", "output": "Error: read"},
                            {"role": "user", "content": [
                                {"type": "input_text", "text": "Attachments from the tool results above:"},
                                {"type": "input_image", "image_url": "data:image/png;base64,iVBOR", "detail": "auto"}]},
                            {"role": "user", "content": "then?"}]}, id="calls-results-in-call-order"),
    pytest.param(msgs(user("go"), assistant([TOOL_USE]), user("interrupted")),
                 {"input": [{"role": "user", "content": "go"},
                            {"type": "function_call", "call_id": "toolu_1", "name": "Bash",
                             "arguments": '{"command": "ls"}'},
                            {"type": "function_call_output", "call_id": "toolu_1",
                             "output": "Tool call was interrupted; no result."},
                            {"role": "user", "content": "interrupted"}]}, id="unanswered-call-repaired"),
    pytest.param(msgs(user("go"), assistant([{"type": "thinking", "thinking": "plan", "signature": SIGNED}, TOOL_USE]),
                      user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}])),
                 {"input": [{"role": "user", "content": "go"}, REPLAYED,
                            {"type": "function_call", "call_id": "toolu_1", "name": "Bash",
                             "arguments": '{"command": "ls"}'},
                            {"type": "function_call_output", "call_id": "toolu_1", "output": "ok"}]},
                 id="signed-thinking-replayed-before-its-call"),
    pytest.param(msgs(user("go"), assistant([{"type": "thinking", "thinking": "a", "signature": "EqQBCkYIB"},
                                             {"type": "thinking", "thinking": "b", "signature": OTHER_MODEL},
                                             {"type": "redacted_thinking", "data": "xyz"},
                                             {"type": "thinking", "thinking": "c", "signature": SIGNED[:-9]},
                                             {"type": "text", "text": "ok"}])),
                 {"input": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok"}]},
                 id="foreign-thinking-dropped"),
])
def test_responses_request_items(body: dict, expected: dict) -> None:
    payload = to_responses(body)
    assert {k: payload[k] for k in expected} == expected
    assert "instructions" in payload or "instructions" not in expected


@pytest.mark.parametrize(("body", "model", "expected", "absent"), [
    pytest.param({"max_tokens": 1}, "gpt-5-codex", {"max_output_tokens": 16, "store": False}, ["reasoning"],
                 id="max-tokens-probe-is-16"),
    pytest.param({"max_tokens": 9000}, "gpt-5-codex", {"max_output_tokens": 4000}, [], id="max-tokens-limit"),
    pytest.param({"thinking": {"type": "enabled", "budget_tokens": 10000}}, "gpt-5-codex",
                 {"reasoning": {"effort": "high", "summary": "auto"}, "include": ["reasoning.encrypted_content"]},
                 [], id="thinking-budget-effort"),
    pytest.param({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "gpt-5.2-codex",
                 {"reasoning": {"effort": "low", "summary": "auto"}}, ["output_config"], id="adaptive-output-config"),
    pytest.param({"thinking": {"type": "adaptive"}}, "gpt-5-pro", {"reasoning": {"effort": "high", "summary": "auto"}},
                 [], id="pro-only-high"),
    pytest.param({"temperature": 0.2, "top_p": 0.9}, "gpt-4.1", {"temperature": 0.2, "top_p": 0.9}, [],
                 id="sampling-where-accepted"),
    pytest.param({"temperature": 0.2, "top_p": 0.9, "top_k": 5}, "gpt-5-codex", {}, ["temperature", "top_p", "top_k"],
                 id="sampling-dropped-for-reasoning-models"),
    pytest.param({"stop_sequences": ["X"], "metadata": {"user_id": "u"}, "service_tier": "auto", "stream": True,
                  "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "gpt-5-codex",
                 {"stream": True}, ["stop", "stop_sequences", "metadata", "service_tier", "context_management",
                                    "stream_options", "messages", "max_tokens"], id="no-chat-or-anthropic-fields"),
    pytest.param({"tools": [BASH_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
                  "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, "gpt-5-codex",
                 {"tools": [{"type": "function", "name": "Bash", "description": "Run", "strict": False,
                             "parameters": BASH_TOOL["input_schema"]}],
                  "tool_choice": "required", "parallel_tool_calls": False}, [], id="tools-flat-server-tools-dropped"),
    pytest.param({"tools": [BASH_TOOL], "tool_choice": {"type": "tool", "name": "Bash"}}, "gpt-5-codex",
                 {"tool_choice": {"type": "function", "name": "Bash"}}, [], id="tool-choice-named"),
    pytest.param({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "gpt-5-codex",
                 {"text": {"format": {"type": "json_schema", "name": "output", "schema": {"type": "object"}}}}, [],
                 id="json-schema-output"),
])
def test_responses_request_fields(body: dict, model: str, expected: dict, absent: list) -> None:
    payload = to_responses({**msgs(user("hi")), **body}, model, max_tokens_limit=4000)
    assert {k: payload.get(k) for k in expected} == expected
    assert not set(absent) & set(payload)


@pytest.mark.parametrize(("output", "status", "reason", "content", "stop_reason"), [
    pytest.param([reasoning_item("Plan", "More"), call_item("call_1", "Bash", {"command": "ls"})], "completed", None,
                 [{"type": "thinking", "thinking": "Plan\n\nMore"},
                  {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}], "tool_use",
                 id="reasoning-then-call"),
    pytest.param([message_item("It is 15°C.")], "completed", None, [{"type": "text", "text": "It is 15°C."}],
                 "end_turn", id="text"),
    pytest.param([message_item("I can't", refusal=True)], "completed", None, [{"type": "text", "text": "I can't"}],
                 "refusal", id="refusal"),
    pytest.param([reasoning_item(encrypted=None)], "incomplete", "max_output_tokens", [{"type": "text", "text": ""}],
                 "max_tokens", id="incomplete-empty"),
    pytest.param([message_item("cut")], "incomplete", "content_filter", [{"type": "text", "text": "cut"}], "refusal",
                 id="content-filter"),
    pytest.param([call_item(KIMI_ID, "Bash", {})], "completed", None,
                 [{"type": "tool_use", "id": vd.client_tool_id(KIMI_ID), "name": "Bash", "input": {}}], "tool_use",
                 id="kimi-id-made-valid"),
])
def test_responses_response_conversion(output: list, status: str, reason: Any, content: list, stop_reason: str) -> None:
    message = vd.responses_to_anthropic(resp_object(*output, status=status, reason=reason),
                                        vd.Conversion(responses="rs:gpt-5-codex"), "claude-x")
    signatures = [block.pop("signature") for block in message["content"] if block["type"] == "thinking"]
    assert message["content"] == content and message["stop_reason"] == stop_reason
    assert all(s.startswith(vd._REASONING_MARK) for s in signatures)
    assert message["usage"] == {"input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 9,
                                "cache_creation_input_tokens": 0}


def test_failed_response_is_an_upstream_error() -> None:
    failed = {**resp_object(), "status": "failed", "error": {"code": "server_error", "message": "boom"}}
    with pytest.raises(vd.UpstreamError, match="boom"):
        vd.responses_to_anthropic(failed, vd.Conversion(responses="rs:m"), "claude-x")


@pytest.mark.parametrize("upstream_id", ["functions.get_weather:0", "call_abc-1", "a b/c", "ünï:1", "x" * 80])
def test_tool_ids_reach_the_client_valid_and_map_back(upstream_id: str) -> None:
    client_id = vd.client_tool_id(upstream_id)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", client_id)
    assert (client_id == upstream_id) == bool(re.fullmatch(r"[a-zA-Z0-9_-]+", upstream_id))
    assert vd._tool_id_for_upstream(client_id, "any") == upstream_id
    mistral = vd._tool_id_for_upstream(client_id, "mistral")
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", mistral) and mistral == vd._tool_id_for_upstream(upstream_id, "mistral")


NEWER_FEATURES = [
    pytest.param({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, id="adaptive-output-config"),
    pytest.param({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, id="context-management"),
    pytest.param({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                  "messages": [user([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral",
                                                                                     "ttl": "5m"}}])]},
                 id="cache-control-ttl"),
    pytest.param({"service_tier": "standard_only", "metadata": {"user_id": "u-1"}, "top_k": 3},
                 id="tier-metadata-top-k"),
    pytest.param({"messages": [user([{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
                                     {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                                     "data": "notes"}, "citations": {"enabled": True}},
                                     {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}}])]},
                 id="documents-url-images"),
    pytest.param({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                            {"type": "code_execution_20250825", "name": "code_execution"}, BASH_TOOL],
                  "tool_choice": {"type": "tool", "name": "web_search"},
                  "messages": [user("q"), assistant([{"type": "server_tool_use", "id": "srvtoolu_1",
                                                      "name": "web_search", "input": {"query": "x"}},
                                                     {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                                                      "content": []}, {"type": "text", "text": "found"}]),
                               user("more")]}, id="server-tools"),
]
CHAT_KEYS = {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "stop", "stream", "stream_options", "reasoning_effort", "response_format"}


@pytest.mark.parametrize("extra", NEWER_FEATURES)
@pytest.mark.parametrize("model", ["gpt-5.1", "gpt-4.1"])
def test_newer_request_features_never_reach_a_strict_upstream(extra: dict, model: str) -> None:
    body = {"max_tokens": 50, **msgs(user("hi")), **extra}
    chat = convert(body, OPENAI, model)
    responses = to_responses(body, model)
    for payload in (chat, responses):
        text = json.dumps(payload)
        assert not re.search(r'"(cache_control|ttl|top_k|metadata|service_tier|context_management|output_config|'
                             r'citations|server_tool_use|web_search|code_execution|srvtoolu_1)"', text), text
    assert set(chat) <= CHAT_KEYS
    assert [t["function"]["name"] for t in chat.get("tools", [])] == [t["name"] for t in responses.get("tools", [])]


def test_responses_models_setting_and_api_selection(tmp_path: Path) -> None:
    config = make_config({"OPENAI_API_KEY": "k", "RS_BASE_URL": "http://h/v1", "RS_API_FORMAT": "responses",
                          "MIX_BASE_URL": "http://m/v1", "MIX_RESPONSES_MODELS": "big-*, exact"}, tmp_path)
    openai, rs, mix = (config.provider(n) for n in ("openai", "rs", "mix"))
    assert [openai.api_for(m) for m in ("gpt-5-codex", "gpt-5.1-codex-max", "gpt-5.4-pro", "o3-pro", "gpt-5.1",
                                        "gpt-4o")] == ["responses"] * 4 + ["openai"] * 2
    assert rs.api_for("anything") == "responses" and rs.reasoning_effort == "always"
    assert [mix.api_for(m) for m in ("big-1", "EXACT", "exact-2")] == ["responses", "responses", "openai"]
    (tmp_path / "vandamme-config.toml").write_text('[mix]\nbase-url = "http://m/v1"\nresponses-models = ["t*"]\n')
    assert make_config({}, tmp_path, cwd=tmp_path).provider("mix").responses_models == ("t*",)
    (tmp_path / "vandamme-config.toml").write_text('[mix]\nbase-url = "http://m/v1"\nresponses-models = "t*"\n')
    with pytest.raises(vd.ConfigError, match="responses-models"):
        make_config({}, tmp_path, cwd=tmp_path)


def test_cli_resolve_shows_the_api(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "k", "OPENAI_ALIAS_OPUS": "gpt-5-codex,gpt-5.1"}
    code, out, _ = run_main(["resolve", "claude-opus-4-1"], env, tmp_path, capsys, monkeypatch)
    assert code == 0 and "api: responses, then chat-completions" in out


def test_fake_responses_upstream_refuses_what_the_real_api_refuses() -> None:
    ok = {"model": "gpt-5-codex", "input": [{"role": "user", "content": "hi"}], "store": False}
    assert responses_rejection(ok) is None
    for bad, fragment in [({"max_tokens": 5}, "max_tokens"), ({"max_output_tokens": 1}, ">= 16"),
                          ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
                           "No tool call"),
                          ({"input": [{"type": "reasoning", "summary": []}, message_item("x")]}, "encrypted_content"),
                          ({"input": [REPLAYED | {"id": "rs_1"}, message_item("x")]}, "not persisted"),
                          ({"temperature": 0.5}, "temperature"), ({"stream_options": {}, "messages": []}, "messages")]:
        assert fragment in (responses_rejection({**ok, **bad}) or ""), bad


def responses_proxy_env(**extra: str) -> dict[str, str]:
    return {"OPENAI_API_FORMAT": "responses", **extra}


THINK_TOOL = {**BASIC, "tools": [BASH_TOOL], "thinking": {"type": "enabled", "budget_tokens": 4000}}
TURN_OUTPUT = (reasoning_item("**Plan** run ls", "then answer"), message_item("Let me look."),
               call_item(KIMI_ID, "Bash", {"command": "ls -la"}))


def turn_two(content: list) -> dict:
    tool_id = next(b["id"] for b in content if b["type"] == "tool_use")
    return {**THINK_TOOL, "messages": [user("list files"), assistant(content),
                                       user([{"type": "tool_result", "tool_use_id": tool_id, "content": "a.txt"}])]}


def assert_replayed(sent: dict) -> None:
    """The second turn as the upstream got it: reasoning back before its call, the original call id."""
    kinds = [item.get("type", "message") for item in sent["input"]]
    assert kinds == ["message", "reasoning", "message", "function_call", "function_call_output"], sent["input"]
    assert sent["input"][1]["encrypted_content"] == "gAAAA-enc-1" and "id" not in sent["input"][1]
    assert sent["input"][3]["call_id"] == sent["input"][4]["call_id"] == KIMI_ID


async def test_responses_provider_json_round_trip(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy(responses_proxy_env())
    upstream.add(Reply(resp_object(*TURN_OUTPUT)))
    response = await client.post("/v1/messages", json=THINK_TOOL)
    message = await response.json()
    assert response.status == 200, message
    assert upstream.last["path"] == "/v1/responses" and upstream.last["body"]["reasoning"]["summary"] == "auto"
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0]["thinking"] == "**Plan** run ls\n\nthen answer"
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", message["content"][2]["id"]) and message["stop_reason"] == "tool_use"
    assert message["usage"]["input_tokens"] == 20 and message["usage"]["cache_read_input_tokens"] == 10
    assert (await client.post("/v1/messages", json=turn_two(message["content"]))).status == 200
    assert_replayed(upstream.last["body"])
    assert (await client.post("/v1/messages", json={**BASIC, "max_tokens": 1})).status == 200   # Claude Code's probe
    upstream.add(Reply({"error": {"message": "Unknown parameter: 'x'.", "type": "invalid_request_error",
                                  "param": "x", "code": "unknown_parameter"}}, status=400))
    refused = await client.post("/v1/messages", json=BASIC)
    assert refused.status == 400 and (await refused.json())["error"] == {
        "type": "invalid_request_error", "message": "openai: Unknown parameter: 'x'."}


def translate_responses(data: bytes, splits: tuple[int, ...] = ()) -> list[tuple[str, dict]]:
    """The gateway's own pipeline for one Responses stream: SSE decoder -> chunks -> translator -> events."""
    decoder = vd.SSEDecoder()
    translator = vd.ResponsesTranslator("claude-x", vd.Conversion(responses="openai:gpt-5.1"))
    events = translator.start()
    bounds = (0, *splits, len(data))
    for start, end in itertools.pairwise(bounds):
        for _name, payload in decoder.feed(data[start:end]):
            for chunk in vd._decode_chunk(payload):
                events += translator.feed(chunk)
    return events + translator.finish()


def test_responses_stream_same_events_at_every_split() -> None:
    data = resp_sse(*resp_events(reasoning_item("ok"), call_item("c1", "Bash", {"c": "é"}), message_item("fin")))
    whole = translate_responses(data)
    expected = validate_stream(vd.encode_events(whole).decode())
    assert [b["type"] for b in final_message(expected)["content"]] == ["thinking", "tool_use", "text"]
    for split in range(1, len(data)):
        events = translate_responses(data, (split,))
        assert [(n, {k: v for k, v in d.items() if k != "message"}) for n, d in events] == [
            (n, {k: v for k, v in d.items() if k != "message"}) for n, d in whole], split


@pytest.mark.parametrize(("events", "content", "stop_reason"), [
    pytest.param(resp_events(*TURN_OUTPUT), [{"type": "thinking", "thinking": "**Plan** run ls\n\nthen answer"},
                                             {"type": "text", "text": "Let me look."},
                                             {"type": "tool_use", "name": "Bash", "input": {"command": "ls -la"}}],
                 "tool_use", id="reasoning-text-call"),
    pytest.param(resp_events(message_item("partial"), status="incomplete", reason="max_output_tokens"),
                 [{"type": "text", "text": "partial"}], "max_tokens", id="incomplete"),
    pytest.param(resp_events(message_item("No.", refusal=True)), [{"type": "text", "text": "No."}], "refusal",
                 id="refusal"),
    pytest.param(resp_events(reasoning_item("a"), reasoning_item("b", item_id="rs_2"), message_item("x")),
                 [{"type": "thinking", "thinking": "a"}, {"type": "thinking", "thinking": "b"},
                  {"type": "text", "text": "x"}], "end_turn", id="two-reasoning-items-two-blocks"),
    pytest.param([e for e in resp_events(call_item("c1", "Bash", {"command": "ls"}), reasoning_item("b"))
                  if "arguments.d" not in e["type"]],
                 [{"type": "tool_use", "name": "Bash", "input": {"command": "ls"}}, {"type": "thinking",
                                                                                     "thinking": "b"}],
                 "tool_use", id="arguments-only-in-the-item"),
])
async def test_responses_provider_stream_split_at_every_byte(proxy: Any, upstream: FakeUpstream, events: list,
                                                             content: list, stop_reason: str) -> None:
    client = await proxy(responses_proxy_env())
    data = resp_sse(*events)
    upstream.add(Reply(stream=[data[i:i + 1] for i in range(len(data))]))
    _response, frames = await post_stream(client, THINK_TOOL)
    message = final_message(frames)
    for block in message["content"]:
        block.pop("id", None)
        assert block.pop("signature", vd._REASONING_MARK).startswith(vd._REASONING_MARK)
    assert message["content"] == content and message["stop_reason"] == stop_reason
    assert message["usage"]["output_tokens"] == 9 and upstream.last["body"]["stream"] is True


@pytest.mark.parametrize("tail", [
    pytest.param([{"type": "response.failed", "response": {"status": "failed",
                                                            "error": {"code": "server_error", "message": "boom"}}}],
                 id="response-failed"),
    pytest.param([{"type": "error", "code": "rate_limit_exceeded", "message": "boom", "param": None}], id="error"),
    pytest.param([], id="cut-before-the-final-event"),
])
async def test_responses_stream_failures_end_with_an_error_event(proxy: Any, upstream: FakeUpstream,
                                                                 tail: list) -> None:
    client = await proxy(responses_proxy_env())
    upstream.add(Reply(stream=resp_sse(*resp_events(message_item("half"), terminal=False), *tail)))
    _response, frames = await post_stream(client, BASIC)
    assert frames[-1][0] == "error" and "message_stop" not in [name for name, _ in frames]
    assert "boom" in frames[-1][1]["error"]["message"] or not tail


async def test_responses_provider_keeps_keys_hooks_fallbacks_and_count_tokens(proxy: Any, upstream: FakeUpstream,
                                                                              tmp_path: Path) -> None:
    seen: dict[str, list] = {"request": [], "chunk": []}

    class Spy(vd.Middleware):
        def on_request(self, exchange: Any, payload: dict) -> None:
            seen["request"].append(sorted(payload))

        def on_upstream_chunk(self, exchange: Any, chunk: dict) -> None:
            seen["chunk"].append(chunk.get("type"))

    client = await proxy(responses_proxy_env(OPENAI_API_KEY="sk-one-0000000001 sk-two-0000000002",
                                             BACK_BASE_URL="{upstream}/back", BACK_API_KEY="b-key-00000001",
                                             OPENAI_ALIAS_SONNET="gpt-5.1,back:m"), middleware=[Spy()])
    upstream.add(Reply({"error": {"message": "slow down"}}, status=429), Reply({"error": {"message": "again"}},
                                                                               status=429))
    _response, frames = await post_stream(client, BASIC)                  # both keys refused: the fallback answers
    assert final_message(frames)["content"] == [{"type": "text", "text": "Hello there"}]
    paths = [(r["path"], r["headers"]["authorization"][-4:]) for r in upstream.requests]
    assert paths == [("/v1/responses", "0001"), ("/v1/responses", "0002"), ("/back/chat/completions", "0001")]
    assert seen["request"][0] == ["input", "max_output_tokens", "model", "store", "stream"]
    _response, frames = await post_stream(client, BASIC)
    assert "response.output_text.delta" in seen["chunk"] and upstream.last["path"] == "/v1/responses"
    counted = await (await client.post("/v1/messages/count_tokens", json=BASIC)).json()
    totals = await (await client.get("/metrics/running-totals")).json()
    assert counted["input_tokens"] > 0 and totals["providers"]["openai"]["requests"] >= 1


@pytest.mark.parametrize(("base", "version", "url"), [
    pytest.param("{upstream}", "2025-04-01-preview", "/openai/responses?api-version=2025-04-01-preview", id="dated"),
    pytest.param("{upstream}/openai/v1", "preview", "/openai/v1/responses", id="v1"),
])
async def test_azure_responses_endpoint(proxy: Any, upstream: FakeUpstream, base: str, version: str,
                                        url: str) -> None:
    client = await proxy({"AZ_API_KEY": "az-key-000000001", "AZ_BASE_URL": base, "AZ_API_VERSION": version,
                          "AZ_API_FORMAT": "responses"})
    response = await client.post("/v1/messages", json={**BASIC, "model": "az:my-codex"})
    assert response.status == 200, await response.text()
    assert upstream.last["raw_path"] == url and upstream.last["body"]["model"] == "my-codex"
    assert upstream.last["headers"]["api-key"] == "az-key-000000001"


async def test_kimi_tool_ids_round_trip_on_chat_completions(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MOON_API_KEY": "m-key-0000001", "MOON_BASE_URL": "{upstream}/v1"})
    upstream.add(Reply(stream=sse(delta(tool_calls=[tc(0, KIMI_ID, "Bash", '{"command": "ls"}')]),
                                  finish("tool_calls"))))
    body = {**BASIC, "model": "moon:kimi-k2", "tools": [BASH_TOOL]}
    _response, frames = await post_stream(client, body)
    content = final_message(frames)["content"]
    assert content[0]["id"] == vd.client_tool_id(KIMI_ID) and re.fullmatch(r"[a-zA-Z0-9_-]+", content[0]["id"])
    turn2 = {**body, "messages": [user("go"), assistant(content),
                                  user([{"type": "tool_result", "tool_use_id": content[0]["id"], "content": "ok"}])]}
    assert (await client.post("/v1/messages", json=turn2)).status == 200
    calls, answers = tool_answer(upstream.last["body"])
    assert calls[0]["id"] == answers[0]["tool_call_id"] == KIMI_ID


@needs_anthropic_sdk
async def test_anthropic_sdk_through_a_responses_provider(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy(responses_proxy_env())
    base = str(client.make_url("")).rstrip("/")
    expected = [{"type": "thinking", "thinking": "**Plan** run ls\n\nthen answer"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": vd.client_tool_id(KIMI_ID), "name": "Bash", "input": {"command": "ls -la"}}]
    async_client = anthropic.AsyncAnthropic(base_url=base, api_key="k", max_retries=0)
    upstream.add(Reply(resp_object(*TURN_OUTPUT)), Reply(stream=resp_sse(*resp_events(*TURN_OUTPUT))))
    created = await async_client.messages.create(**THINK_TOOL)
    async with async_client.messages.stream(**THINK_TOOL) as stream:
        streamed = await stream.get_final_message()
    await async_client.close()

    def sync_calls() -> list:
        sync_client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        try:
            with sync_client.messages.stream(**THINK_TOOL) as stream:
                return [sync_client.messages.create(**THINK_TOOL), stream.get_final_message()]
        finally:
            sync_client.close()

    upstream.add(Reply(stream=resp_sse(*resp_events(*TURN_OUTPUT))), Reply(resp_object(*TURN_OUTPUT)))
    for message in [created, streamed, *await asyncio.to_thread(sync_calls)]:
        assert _plain(message.content) == expected and message.stop_reason == "tool_use"
        assert message.content[0].signature.startswith(vd._REASONING_MARK)


async def test_reasoning_continuity_across_two_gateway_processes(upstream: FakeUpstream, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-proc-000000001", "OPENAI_BASE_URL": f"{upstream.url}/v1",
           "OPENAI_API_FORMAT": "responses"}
    upstream.add(Reply(stream=resp_sse(*resp_events(*TURN_OUTPUT))))
    contents = []
    for turn in range(2):
        proc = ProxyProcess(HERE / "vandamme.py", env, tmp_path)
        try:
            await proc.wait_ready()
            async with aiohttp.ClientSession() as session:
                body = turn_two(contents[0]) if turn else THINK_TOOL
                async with session.post(f"{proc.url}/v1/messages", json={**body, "stream": True}) as response:
                    contents.append(final_message(validate_stream(await response.text()))["content"])
        finally:
            assert proc.stop() == 0
    assert_replayed(upstream.last["body"])
    assert contents[1] == [{"type": "text", "text": "Hello there"}]


async def test_claude_code_thinking_tool_round_trip_through_responses(claude_bin: str, upstream: FakeUpstream,
                                                                      tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "note.txt").write_text("fixture-content-77\n")
    read = call_item(KIMI_ID, "Read", {"file_path": str(work / "note.txt")})
    upstream.add(Reply(stream=resp_sse(*resp_events(reasoning_item("The user wants the file."), read))),
                 Reply(stream=resp_sse(*resp_events(message_item("The file says fixture-content-77 (ok-3141).")))))
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-cc", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "OPENAI_API_FORMAT": "responses"}, tmp_path)
    try:
        await proc.wait_ready()
        code, result, output = await run_claude(claude_bin, proc.url, "read note.txt", work, "Read")
    finally:
        proc.stop()
    assert code == 0 and "ok-3141" in result.get("result", ""), output + proc.log()
    sent = [r["body"] for r in upstream.requests if r["path"] == "/v1/responses"][-1]
    kinds = [item.get("type", "message") for item in sent["input"]]
    at = kinds.index("function_call")
    assert kinds[at - 1:at + 2] == ["reasoning", "function_call", "function_call_output"], sent["input"]
    assert sent["input"][at - 1]["encrypted_content"] == "gAAAA-enc-1" and sent["input"][at]["call_id"] == KIMI_ID
    assert "fixture-content-77" in json.dumps(sent["input"][at + 1]["output"])
# ---------------------------------------------------------------------------
# §9 Dialects and middleware (pure parts)
# ---------------------------------------------------------------------------

def test_think_splitter_handles_tags_split_anywhere() -> None:
    text = "<think>plan the work</think>The answer."
    for i in range(len(text) + 1):
        splitter = vd.ThinkSplitter()
        parts = [splitter.feed(text[:i]), splitter.feed(text[i:])]
        assert "".join(p[0] for p in parts) == "plan the work", i
        assert "".join(p[1] for p in parts) == "The answer.", i


@pytest.mark.parametrize(("parts", "reasoning", "visible"), [
    pytest.param(["Result <", "thi"], "", "Result <thi", id="partial-open-tag"),
    pytest.param(["<think>plan</thi"], "plan</thi", "", id="partial-close-tag"),
    pytest.param(["done"], "", "done", id="nothing-held"),
])
def test_think_splitter_flush_releases_held_back_text(parts: list, reasoning: str, visible: str) -> None:
    splitter = vd.ThinkSplitter()
    fed = [splitter.feed(part) for part in parts]
    flushed = splitter.flush()
    delta = flushed["choices"][0]["delta"] if flushed else {"reasoning_content": "", "content": ""}
    assert "".join(r for r, _ in fed) + delta["reasoning_content"] == reasoning
    assert "".join(v for _, v in fed) + delta["content"] == visible
    assert splitter.flush() is None


def test_gemini_schema_cleaning() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "additionalProperties": False,
              "properties": {"url": {"type": "string", "format": "uri"}, "n": {"type": ["integer", "null"],
                                                                             "exclusiveMinimum": 0},
                             "tags": {"type": "array"}, "mode": {"const": "x", "type": "string", "enum": ["x"]}},
              "required": ["url"]}
    assert vd.clean_schema_for_gemini(schema) == {
        "type": "object", "required": ["url"],
        "properties": {"url": {"type": "string"}, "n": {"type": "integer", "nullable": True},
                       "tags": {"type": "array", "items": {"type": "string"}},
                       "mode": {"type": "string", "enum": ["x"]}}}


# ---------------------------------------------------------------------------
# §9 Dialects and middleware end to end: Anthropic relay, Azure, Gemini, DeepSeek, think tags
# ---------------------------------------------------------------------------

ANTHROPIC_STREAM = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_up","type":"message",'
                    b'"role":"assistant","model":"claude-real","content":[],"stop_reason":null,"stop_sequence":null,'
                    b'"usage":{"input_tokens":21,"output_tokens":1}}}\n\n'
                    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
                    b'{"type":"text","text":""}}\n\nevent: ping\ndata: {"type": "ping"}\n\n'
                    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
                    b'{"type":"text_delta","text":"Hi"}}\n\n'
                    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
                    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
                    b'"stop_sequence":null},"usage":{"output_tokens":3}}\n\n'
                    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def test_anthropic_passthrough_is_byte_exact(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"ANT_API_KEY": "ant-key-000000000", "ANT_BASE_URL": "{upstream}/v1",
                          "ANT_API_FORMAT": "anthropic", "ANT_ALIAS_SONNET": "claude-real"})
    sample = FIXTURES / "messages_basic_sonnet.json"        # the real body when the shared fixtures are here
    body = json.loads(sample.read_text()) if sample.is_file() else {
        **BASIC, "thinking": {"type": "enabled", "budget_tokens": 2000}, "stream": True}
    body["model"] = "ant:sonnet"
    body["stream"] = True
    raw = json.dumps(body, indent=1).encode()
    upstream.add(Reply(stream=[ANTHROPIC_STREAM[i:i + 50] for i in range(0, len(ANTHROPIC_STREAM), 50)]))
    response = await client.post("/v1/messages?beta=true", data=raw, headers={
        "Content-Type": "application/json", "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
        "x-api-key": "client-key"})
    assert await response.read() == ANTHROPIC_STREAM
    sent = upstream.last
    assert response.headers["request-id"] == sent["headers"]["x-request-id"]
    assert sent["path"] == "/v1/messages"
    assert sent["raw"] == raw.replace(b'"ant:sonnet"', b'"claude-real"')
    assert sent["headers"]["x-api-key"] == "ant-key-000000000"
    assert sent["headers"]["anthropic-beta"] == "claude-code-20250219"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    # errors are relayed with their own status and body
    upstream.add(Reply({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, status=529))
    response = await client.post("/v1/messages", json={**BASIC, "model": "ant:x"})
    assert response.status == 529 and (await response.json())["error"]["message"] == "busy"
    # count_tokens goes upstream too
    upstream.add(Reply({"input_tokens": 4242}))
    response = await client.post("/v1/messages/count_tokens", json={"model": "ant:x", "messages": []})
    assert await response.json() == {"input_tokens": 4242} and upstream.last["path"] == "/v1/messages/count_tokens"
    assert response.headers["request-id"] == upstream.last["headers"]["x-request-id"]


async def test_passthrough_bearer_auth_setting(proxy: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "vandamme-config.toml").write_text(
        f'[gw]\nbase-url = "{upstream.url}"\napi-format = "anthropic"\napi-key = "gw-key"\nauth-header = "bearer"\n')
    client = await proxy()
    upstream.add(Reply({"id": "m", "type": "message", "content": []}))
    await client.post("/v1/messages", json={**BASIC, "model": "gw:claude"})
    assert upstream.last["path"] == "/v1/messages" and upstream.last["headers"]["authorization"] == "Bearer gw-key"


@pytest.mark.parametrize(("base", "path", "query"), [
    pytest.param("/azure", "/azure/openai/deployments/gpt-4o-dep/chat/completions", {"api-version": "2024-10-21"},
                 id="deployments"),
    pytest.param("/azure/openai/v1", "/azure/openai/v1/chat/completions", {}, id="v1"),
])
async def test_azure_url_query_and_header(proxy: Any, upstream: FakeUpstream, base: str, path: str,
                                          query: dict) -> None:
    client = await proxy({"AZURE_API_KEY": "az-key-000000", "AZURE_BASE_URL": "{upstream}" + base,
                          "AZURE_API_VERSION": "2024-10-21"})
    response = await client.post("/v1/messages", json={**BASIC, "model": "azure:gpt-4o-dep"})
    assert response.status == 200
    assert upstream.last["path"] == path and upstream.last["query"] == query
    assert upstream.last["headers"]["api-key"] == "az-key-000000" and "authorization" not in upstream.last["headers"]


GEMINI_SIG = "CiQB0e2Kb+/abc=="


async def test_gemini_thought_signature_round_trip_survives_restart(proxy: Any, upstream: FakeUpstream) -> None:
    env = {"GEMINI_API_KEY": "g-key", "GEMINI_BASE_URL": "{upstream}/v1beta/openai"}
    call = {"index": 0, "id": "fc_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'},
            "extra_content": {"google": {"thought_signature": GEMINI_SIG}}}
    for stream in (False, True):
        first = await proxy(env)
        if stream:
            upstream.add(Reply(stream=sse(delta(tool_calls=[call]), finish("tool_calls"))))
            _r, frames = await post_stream(first, {**BASIC, "model": "gemini:gemini-2.5-pro", "tools": [BASH_TOOL]})
            content = final_message(frames)["content"]
        else:
            upstream.add(Reply(completion(None, tool_calls=[call], finish_reason="tool_calls")))
            content = (await (await first.post("/v1/messages", json={**BASIC, "model": "gemini:gemini-2.5-pro",
                                                                     "tools": [BASH_TOOL]})).json())["content"]
        tool_id = content[0]["id"]
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", tool_id) and tool_id.startswith("fc_1")
        await first.close()
        second = await proxy(env)                           # a fresh instance: no shared state
        turn2 = {**BASIC, "model": "gemini:gemini-2.5-pro", "tools": [BASH_TOOL], "messages": [
            user("go"), assistant(content), user([{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}])]}
        assert (await second.post("/v1/messages", json=turn2)).status == 200
        sent = upstream.last["body"]
        assert sent["messages"][-2]["tool_calls"][0]["id"] == "fc_1"
        assert sent["messages"][-2]["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": GEMINI_SIG}}
        assert sent["messages"][-1]["tool_call_id"] == "fc_1"
        assert "$schema" not in json.dumps(sent["tools"])
        await second.close()


async def test_gemini_signatures_can_be_disabled(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"GEMINI_API_KEY": "g", "GEMINI_BASE_URL": "{upstream}/v1beta/openai",
                          "GEMINI_THOUGHT_SIGNATURES_ENABLED": "false"})
    call = {"id": "fc_1", "type": "function", "function": {"name": "Bash", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": GEMINI_SIG}}}
    upstream.add(Reply(completion(None, tool_calls=[call], finish_reason="tool_calls")))
    message = await (await client.post("/v1/messages", json={**BASIC, "model": "gemini:g"})).json()
    assert message["content"][0]["id"] == "fc_1"


async def test_deepseek_reasoning_content_round_trip(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"DEEPSEEK_API_KEY": "ds", "DEEPSEEK_BASE_URL": "{upstream}"})
    upstream.add(Reply(stream=sse(delta(reasoning_content="I should list."),
                                  delta(tool_calls=[tc(0, "c1", "Bash", "{}")]), finish("tool_calls"))))
    _r, frames = await post_stream(client, {**BASIC, "model": "deepseek:deepseek-reasoner", "tools": [BASH_TOOL]})
    content = final_message(frames)["content"]
    assert content[0]["type"] == "thinking" and content[0]["signature"]
    turn2 = {**BASIC, "model": "deepseek:deepseek-reasoner", "tools": [BASH_TOOL], "messages": [
        user("go"), assistant(content), user([{"type": "tool_result", "tool_use_id": "c1", "content": "ok"}])]}
    await client.post("/v1/messages", json=turn2)
    sent = upstream.last["body"]["messages"]
    assert sent[-2]["reasoning_content"] == "I should list." and sent[-2]["tool_calls"]
    # providers without the setting never see it
    await client.post("/v1/messages", json={**turn2, "model": "gpt-4o"})
    assert "reasoning_content" not in upstream.last["body"]["messages"][-2]


async def test_think_tags_become_thinking_blocks(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OLLAMA_BASE_URL": "{upstream}/v1"})
    upstream.add(Reply(stream=sse(delta(content="<thi"), delta(content="nk>weigh"), delta(content="ing</think>"),
                                  delta(content="Result"), finish())))
    _r, frames = await post_stream(client, {**BASIC, "model": "ollama:qwen3"})
    content = final_message(frames)["content"]
    assert [b["type"] for b in content] == ["thinking", "text"]
    assert content[0]["thinking"] == "weighing" and content[1]["text"] == "Result"
    assert "stream_options" not in upstream.last["body"]
    upstream.add(Reply(completion("<think>plan</think>\n\nDone")))
    message = await (await client.post("/v1/messages", json={**BASIC, "model": "ollama:qwen3"})).json()
    assert message["content"][0]["thinking"] == "plan" and message["content"][1]["text"] == "Done"


async def test_think_tags_partial_tag_at_stream_end_stays_visible(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OLLAMA_BASE_URL": "{upstream}/v1"})
    upstream.add(Reply(stream=sse(delta(content="<think>a</think>Use a <"), delta(content="thi"), finish())))
    _r, frames = await post_stream(client, {**BASIC, "model": "ollama:qwen3"})
    assert [b.get("text") for b in final_message(frames)["content"]] == [None, "Use a <thi"]


MIDDLEWARE_FILE = '''
def on_request(exchange, payload):
    payload["messages"].insert(0, {"role": "system", "content": "house rules"})
    payload["user"] = exchange.request_id

def on_response(exchange, message):
    message["content"][0]["text"] += " [checked]"

def on_event(exchange, event):
    if event["event"] == "content_block_delta" and event["data"]["delta"]["type"] == "text_delta":
        event["data"]["delta"]["text"] = event["data"]["delta"]["text"].upper()
'''


async def test_readme_middleware_example_works(proxy: Any, upstream: FakeUpstream, tmp_path: Path,
                                               capsys: Any) -> None:
    readme = (HERE / "README.md").read_text()
    start = readme.index("# hooks.py: python vandamme.py --middleware hooks.py")
    path = tmp_path / "hooks.py"
    path.write_text(readme[start:readme.index("```", start)])
    client = await proxy(middleware=vd.load_middleware(str(path)))
    message = await (await client.post("/v1/messages", json=BASIC)).json()
    served = upstream.last["body"]["model"]
    assert message["content"][-1]["text"].endswith(f"(served by {served})")
    assert upstream.last["body"]["messages"][0]["content"] == "Answer in British English."
    response, _frames = await post_stream(client, BASIC)
    assert f"{response.headers['request-id']}: 11 characters streamed" in capsys.readouterr().out


async def test_user_middleware_file_edits_request_and_response(proxy: Any, upstream: FakeUpstream,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "hooks.py"
    path.write_text(MIDDLEWARE_FILE)
    client = await proxy(middleware=vd.load_middleware(str(path)))
    message = await (await client.post("/v1/messages", json=BASIC)).json()
    assert message["content"][0]["text"] == "Hello there [checked]"
    assert upstream.last["body"]["messages"][0] == {"role": "system", "content": "house rules"}
    assert upstream.last["body"]["user"].startswith("req_")
    _r, frames = await post_stream(client, BASIC)
    assert final_message(frames)["content"][0]["text"] == "HELLO THERE"


async def test_failing_middleware_is_a_clean_api_error(proxy: Any, upstream: FakeUpstream) -> None:
    class Broken(vd.Middleware):
        name = "broken"

        def on_upstream_chunk(self, exchange: Any, chunk: Any) -> None:
            raise RuntimeError("bug in hook")

        def on_request(self, exchange: Any, payload: Any) -> None:
            if not exchange.stream:
                raise ValueError("nope")

    client = await proxy(middleware=[Broken()])
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 500 and body["error"]["type"] == "api_error" and "broken" in body["error"]["message"]
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = validate_stream(await response.text())
    assert frames[-1][0] == "error" and "bug in hook" in frames[-1][1]["error"]["message"]


def test_middleware_file_that_fails_to_import_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('missing dependency')\n")
    with pytest.raises(vd.ConfigError, match="missing dependency"):
        vd.load_middleware(str(bad))


# ---------------------------------------------------------------------------
# §10 Token estimate
# ---------------------------------------------------------------------------

def test_count_tokens_counts_system_messages_tools_and_images() -> None:
    base = {"model": "m", "messages": [user("hello there")]}
    small = vd.count_request_tokens(base)
    assert small >= 1
    assert vd.count_request_tokens({**base, "system": "You are a helpful assistant. " * 20}) > small + 80
    assert vd.count_request_tokens({**base, "tools": [BASH_TOOL] * 5}) > small + 50
    assert vd.count_request_tokens({**base, "messages": [user([IMAGE, {"type": "text", "text": "x"}])]}) > 1000


TOKEN_PROSE = ('The old lighthouse on the northern cape had not been lit for almost thirty years, but the people of '
    'the village still talked about it as if it might come back to life at any moment. Children dared eac'
    'h other to climb the rusted spiral staircase, and fishermen, returning late in the evening, would gl'
    'ance up at the dark lantern room out of habit, half expecting to see the familiar sweep of light acr'
    'oss the water.\n\nWhen the council finally voted to restore it, the decision surprised almost everyone'
    '. The budget was tight, the harbour needed dredging, and the primary school roof leaked every winter'
    '. Yet the argument that carried the meeting was not about money at all. It was about memory: a town,'
    ' one councillor said, needs something on the horizon that tells it where home is.\n\nThe restoration t'
    'ook two summers. Volunteers scraped away decades of salt and paint, an engineer from the city rebuil'
    't the clockwork mechanism that once turned the great lens, and a retired teacher catalogued every lo'
    'gbook the keepers had left behind. Those books turned out to be the real treasure. In neat handwriti'
    "ng they recorded storms, shipwrecks narrowly avoided, births and funerals in the keeper's family,")
TOKEN_CODE = ('    def _lines(self, lines: list[bytes]) -> list[tuple[str, bytes]]:\n'
    '        events = []\n'
    '        for line in lines:\n'
    '            if line.endswith(b"\\r"):\n'
    '                line = line[:-1]\n'
    '            if not line:\n'
    '                if self._data:\n'
    '                    events.append((self._event or "message", b"\\n".join(self._data)))\n'
    '                    self._data = []\n'
    '                self._event = ""\n'
    '            elif line[0] != 58:                       # b":" starts a comment\n'
    '                name, _, value = line.partition(b":")\n'
    '                if value[:1] == b" ":\n'
    '                    value = value[1:]\n'
    '                if name == b"data":\n'
    '                    self._data.append(value)\n'
    '                elif name == b"event":\n'
    '                    self._event = value.decode("utf-8", "replace")\n'
    '        return events\n')


@pytest.mark.parametrize(("sample", "o200k", "cl100k"), [
    pytest.param("prose", 239, 240, id="english-prose"),
    pytest.param("code", 177, 176, id="python-code"),
    pytest.param("tools_default.json", 8085, 8104, id="json-schemas"),
    pytest.param("messages_basic_sonnet.json", 12328, 12373, id="claude-code-body"),
])
def test_token_estimate_tracks_real_tokenizers(sample: str, o200k: int, cl100k: int) -> None:
    """estimate_tokens against tiktoken's o200k_base and cl100k_base (counted offline with the
    vocab files shipped in the `bpe-openai` wheel; tiktoken and bpe-openai agree on every sample).

    | sample                                  | chars  | o200k  | cl100k | estimate | ratio |
    |-----------------------------------------|--------|--------|--------|----------|-------|
    | English prose (TOKEN_PROSE)             |  1,197 |    239 |    240 |      248 | 1.04  |
    | Python code (TOKEN_CODE)                |    814 |    177 |    176 |      184 | 1.04  |
    | Claude Code tools_default.json (schemas)| 33,651 |  8,085 |  8,104 |    8,268 | 1.02  |
    | messages_basic_sonnet.json (whole body) | 52,070 | 12,328 | 12,373 |   12,682 | 1.03  |

    Over the calibration corpus (176 samples: prose, Markdown, Python/JS, tool output, schemas,
    request bodies) the ratio stays within 0.94-1.19; non-English text is less exact (0.73-1.9).
    """
    if sample == "prose":
        text = TOKEN_PROSE
    elif sample == "code":
        text = TOKEN_CODE
    else:
        text = shared_fixture(sample).read_text()
    estimate = vd.estimate_tokens(text)
    for reference in (o200k, cl100k):
        assert 0.8 * reference <= estimate <= 1.2 * reference
    assert vd.estimate_tokens("x") == 1 and vd.estimate_tokens("") == 0


# ---------------------------------------------------------------------------
# §11 Metrics
# ---------------------------------------------------------------------------

def test_metrics_snapshot_and_filters() -> None:
    metrics = vd.Metrics(clock=lambda: 1_000_000.0)
    for provider, model, status, error in (("openai", "gpt", 200, None), ("openai", "gpt", 429, "rate_limit_error"),
                                           ("groq", "llama", 200, None)):
        metrics.begin(provider, model)
        metrics.end(provider, model)
        metrics.record(vd.RequestRecord(request_id="r", provider=provider, model=model, status=status,
                                        error_type=error, input_tokens=10, output_tokens=2, ttft_ms=50.0))
    snap = metrics.snapshot()
    assert snap["totals"]["requests"] == 3 and snap["totals"]["errors"] == 1
    assert snap["totals"]["input_tokens"] == 30 and snap["totals"]["in_flight"] == 0
    assert snap["providers"]["openai"]["errors_by_type"] == {"rate_limit_error": 1}
    assert snap["providers"]["openai"]["models"]["gpt"]["requests"] == 2
    assert snap["totals"]["ttft_ms"]["p50"] is not None and snap["series"][0]["requests"] == 3
    assert list(metrics.snapshot(provider="groq")["providers"]) == ["groq"]
    assert list(metrics.snapshot(model="gpt")["providers"]) == ["openai"]


def test_prometheus_exposition_parses() -> None:
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed "
                                 "(pip install -e '.[test]')")
    metrics = vd.Metrics()
    metrics.record(vd.RequestRecord(request_id="r", provider="openai", model='we"ird\\model', status=200,
                                    input_tokens=5, output_tokens=1, ttft_ms=12.0))
    families = {f.name: f for f in parser.text_string_to_metric_families(metrics.prometheus())}
    assert {"vandamme_requests", "vandamme_tokens", "vandamme_request_duration_seconds",
            "vandamme_time_to_first_token_seconds", "vandamme_in_flight"} <= set(families)
    sample = families["vandamme_requests"].samples[0]
    assert sample.labels == {"provider": "openai", "model": 'we"ird\\model', "status": "200"} and sample.value == 1
    buckets = [s for s in families["vandamme_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1


def test_model_series_are_bounded_and_hostile_names_cannot_break_the_exposition() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = vd.Metrics()
    hostile = ['q"uote', "back\\slash", "new\nline", "lone\ud800surrogate", "ünï", "a} 1\n# TYPE x counter"]
    for n, model in enumerate(hostile + [f"m{i}" for i in range(10_000)]):
        metrics.record(vd.RequestRecord(request_id="r", provider="openai", model=model, status=200, input_tokens=n))
    text = metrics.prometheus()
    assert text.encode("utf-8")                 # what aiohttp does with it: no lone surrogate survives
    requests = {s.labels["model"]: s.value for f in parser.text_string_to_metric_families(text)
                if f.name == "vandamme_requests" for s in f.samples}
    assert len(requests) == vd._MODELS_PER_PROVIDER + 1 and requests["other"] == 10_006 - vd._MODELS_PER_PROVIDER
    assert {'q"uote', "back\\slash", "new\nline", "lone\\ud800surrogate", "a} 1\n# TYPE x counter"} <= set(requests)
    assert sum(requests.values()) == 10_006 and len(metrics.snapshot()["providers"]["openai"]["models"]) == 201


async def test_metrics_endpoint_survives_hostile_model_names(proxy: Any, upstream: FakeUpstream) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    client = await proxy()
    for model in ('openai:we"ird', "openai:back\\slash", "openai:x} 1\nfake 2", "openai:\u2028ünï"):
        await client.post("/v1/messages", json={**BASIC, "model": model})
    response = await client.get("/metrics")
    models = {s.labels["model"] for f in parser.text_string_to_metric_families(await response.text())
              if f.name == "vandamme_requests" for s in f.samples}
    assert response.status == 200 and {'we"ird', "back\\slash", "\u2028ünï"} <= models


def _worker_metrics(start: float, records: list[tuple[str, int, float]], in_flight: int) -> vd.Metrics:
    now = [start]
    metrics = vd.Metrics(clock=lambda: now[0])
    for model, status, at in records:
        now[0] = at
        metrics.record(vd.RequestRecord(request_id=f"r{at}", provider="openai", model=model, status=status,
                                        error_type="api_error" if status >= 500 else None, latency_ms=at,
                                        ttft_ms=at / 2, output_tokens=1))
    for _ in range(in_flight):
        metrics.begin("openai", "gpt")
    return metrics


def test_merged_worker_states_add_up() -> None:
    a = _worker_metrics(1000.0, [("gpt", 200, 1001.0), ("gpt", 502, 1015.0)], in_flight=1)
    b = _worker_metrics(990.0, [("gpt", 200, 1005.0), ("o3", 200, 1030.0)], in_flight=2)
    dead = _worker_metrics(995.0, [("gpt", 200, 1002.0)], in_flight=5)
    merged = vd.Metrics(clock=lambda: 1040.0)
    for worker, live in ((a, True), (b, True), (dead, False)):
        merged.absorb(json.loads(json.dumps(worker.state())), live)
    snap = merged.snapshot()
    assert snap["uptime_s"] == 50.0 and snap["totals"]["requests"] == 5 and snap["totals"]["in_flight"] == 3
    gpt = snap["providers"]["openai"]["models"]["gpt"]
    assert (gpt["requests"], gpt["errors"], gpt["errors_by_type"], gpt["output_tokens"]) == (4, 1, {"api_error": 1}, 4)
    assert gpt["last_error"]["time"] == 1015.0 and snap["providers"]["openai"]["in_flight"] == 3
    assert [r["time"] for r in snap["recent"]] == [1030.0, 1015.0, 1005.0, 1002.0, 1001.0]
    assert [(s["t"], s["requests"], s["errors"]) for s in snap["series"]] == [(1000, 3, 0), (1010, 1, 1), (1030, 1, 0)]
    assert sum(merged.totals.latency.counts) == 5 and merged.totals.latency.sum == 1001 + 1015 + 1005 + 1030 + 1002
    assert 'vandamme_requests_total{provider="openai",model="gpt",status="200"} 3' in merged.prometheus()


# ---------------------------------------------------------------------------
# §12 Upstream client: retries, fallbacks, disconnects, hostile input
# ---------------------------------------------------------------------------

async def test_retries_on_5xx_and_connection_reset(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MAX_RETRIES": "2"})
    upstream.add(Reply({"error": {"message": "down"}}, status=503), Reply(reset=True))
    response = await client.post("/v1/messages", json=BASIC)
    assert response.status == 200 and len(upstream.requests) == 3
    upstream.add(*(Reply({"error": {"message": "down"}}, status=502) for _ in range(3)))
    response = await client.post("/v1/messages", json=BASIC)
    assert response.status == 502 and len(upstream.requests) == 6
    upstream.add(Reply({"error": {"message": "bad"}}, status=400))
    assert (await client.post("/v1/messages", json=BASIC)).status == 400 and len(upstream.requests) == 7


async def test_retry_after_is_honoured(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MAX_RETRIES": "1"})
    upstream.add(Reply({"error": {"message": "busy"}}, status=529, headers={"retry-after": "0.6"}))
    started = time.monotonic()
    assert (await client.post("/v1/messages", json=BASIC)).status == 200
    assert time.monotonic() - started >= 0.55


async def test_fallback_chain_serves_from_next_target(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"BACKUP_API_KEY": "b-key", "BACKUP_BASE_URL": "{upstream}/backup",
                          "OPENAI_ALIAS_SONNET": "gpt-main,backup:backup-model"})
    upstream.add(Reply({"error": {"message": "down"}}, status=503))
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = validate_stream(await response.text())
    assert frames[0][1]["message"]["model"] == BASIC["model"]
    assert [r["body"]["model"] for r in upstream.requests] == ["gpt-main", "backup-model"]
    assert upstream.last["path"] == "/backup/chat/completions"
    totals = await (await client.get("/metrics/running-totals")).json()
    assert totals["providers"]["backup"]["requests"] == 1
    upstream.add(Reply({"error": {"message": "wrong"}}, status=400))   # not retryable: no fallback
    assert (await client.post("/v1/messages", json=BASIC)).status == 400


async def test_client_disconnects_close_upstream_and_leave_nothing_behind(proxy: Any, upstream: FakeUpstream) -> None:
    """200 streams cut part-way: the upstream sees every connection end; tasks return to baseline."""
    client = await proxy()
    slow = [sse(delta(content=f"{i} "), done=False) for i in range(50)]
    await client.post("/v1/messages", json=BASIC)
    baseline = len(asyncio.all_tasks())
    url = client.make_url("/v1/messages")
    for _ in range(200):
        upstream.add(Reply(stream=slow, chunk_delay=0.05))

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, json={**BASIC, "stream": True}) as response:
            await response.content.readline()
            await response.content.readline()
        # leaving the block without reading closes the connection

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(200)))
    await until(lambda: upstream.active == 0 and len(asyncio.all_tasks()) <= baseline + 1)
    assert upstream.ended >= 201
    totals = await (await client.get("/metrics/running-totals")).json()
    assert totals["totals"]["in_flight"] == 0
    assert totals["totals"]["errors_by_type"].get("client_closed", 0) >= 150


async def test_disconnect_before_first_byte_cancels_upstream(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(completion("late"), delay=3))      # answers only after the assertion below
    task = asyncio.create_task(client.post("/v1/messages", json=BASIC))
    await until(lambda: upstream.active == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: upstream.active == 0, timeout=1.5)   # well before the upstream would have answered


def json_containers(inner: Any) -> Any:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-5, 10 ** 6) | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, json_containers, max_leaves=20)
FIELDS = ("model", "messages", "max_tokens", "system", "tools", "tool_choice", "stream", "thinking", "temperature",
          "stop_sequences", "metadata")
BLOCK = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "document",
                                                         "thinking", "nope"])}, optional={
    "text": JSON_VALUES, "source": JSON_VALUES, "id": JSON_VALUES, "name": JSON_VALUES, "input": JSON_VALUES,
    "tool_use_id": JSON_VALUES, "content": JSON_VALUES, "is_error": JSON_VALUES})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                 "content": st.one_of(st.text(max_size=10), st.lists(BLOCK, max_size=3), JSON_VALUES)})
BODY = st.one_of(JSON_VALUES, st.fixed_dictionaries({"model": st.sampled_from(["claude-sonnet-5-5", "gpt-x"]),
                                                     "messages": st.lists(MESSAGE, max_size=3)},
                                                    optional=dict.fromkeys(FIELDS[2:], JSON_VALUES)))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODY)
def test_any_body_converts_or_is_a_400(body: Any) -> None:
    try:
        vd.validate_messages_request(body)
        payload, _conv = vd.anthropic_to_openai(body, OPENAI, "gpt-4o")
    except vd.InvalidRequestError as exc:
        assert exc.status == 400 and str(exc)
    else:
        json.dumps(payload)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


async def test_wrong_type_at_every_field_is_never_a_5xx(proxy: Any) -> None:
    """Every field of a full tool round-trip body, replaced by each JSON type in turn."""
    client = await proxy()
    body = {**BASIC, "system": [{"type": "text", "text": "s"}], "tools": [BASH_TOOL], "tool_choice": {"type": "auto"},
            "thinking": {"type": "enabled", "budget_tokens": 2000}, "stop_sequences": ["x"], "temperature": 0.5,
            "metadata": {"user_id": "u"}, "messages": [
                user([{"type": "text", "text": "go"}, IMAGE]), assistant([TOOL_USE]),
                user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "r"}]}])]}
    checked = 0
    for path in _paths(body):
        for wrong in (None, 7, "x", [], {}, True, [1, {"a": None}]):
            mutated = _replaced(body, path, wrong)
            response = await client.post("/v1/messages", json=mutated)
            data = await response.read()
            assert response.status < 500, (path, wrong, data)
            if response.status >= 400:
                error = json.loads(data)
                assert error["type"] == "error" and error["error"]["message"] and b"Traceback" not in data
            checked += 1
    assert checked > 300


CHUNK = st.one_of(JSON_VALUES, st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({}, optional={
    "index": st.sampled_from([0, 0, 1, None, "0"]),
    "finish_reason": st.sampled_from([None, "stop", "length", "tool_calls", "content_filter", "error", 3]),
    "delta": st.fixed_dictionaries({}, optional={
        "content": st.one_of(st.text(max_size=8), JSON_VALUES),
        "reasoning_content": st.text(max_size=8),
        "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
            "index": st.sampled_from([0, 1, 2, None]), "id": st.sampled_from([None, "a", "b", "", 7]),
            "function": st.fixed_dictionaries({}, optional={
                "name": st.sampled_from([None, "Bash", "Read"]),
                "arguments": st.sampled_from(['{"a"', ": 1}", "{}", '{"x": [1, 2]}', "", "}{", '"s"'])})}),
            max_size=3)})}), max_size=2)}, optional={"usage": JSON_VALUES}),
                  st.fixed_dictionaries({"error": JSON_VALUES}))      # in-band errors (a falsy one is none)


def is_in_band_error(chunk: Any) -> bool:
    """An OpenAI-format chunk reporting an upstream error: a truthy `error`, or a choice finishing with "error"."""
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices") if isinstance(chunk.get("choices"), list) else []
    return bool(chunk.get("error")) or any(isinstance(c, dict) and c.get("index", 0) in (0, None)
                                           and c.get("finish_reason") == "error" for c in choices)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(CHUNK, max_size=12))
def test_any_chunk_sequence_gives_a_grammatical_stream(chunks: list) -> None:
    """Any chunks give a valid stream; an in-band upstream error ends it with an `error` event.

    The translator raises UpstreamError for such a chunk and the relay writes `exc`'s error
    event after what was already sent; this does the same.
    """
    translator = vd.StreamTranslator("m", input_tokens=1)
    events = translator.start()
    try:
        for chunk in chunks:
            events += translator.feed(chunk)
        events += translator.finish()
    except vd.UpstreamError as exc:
        assert exc.status == 502 and exc.error_type == "api_error" and str(exc)
        events.append(("error", vd.error_body(exc.error_type, str(exc))))
    frames = validate_stream(vd.encode_events(events).decode())
    assert (frames[-1][0] == "error") == any(is_in_band_error(chunk) for chunk in chunks), frames[-1]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=JSON_VALUES, indent=st.sampled_from([None, 1, 4]))
def test_decode_with_spans_equals_json_loads(value: Any, indent: Any) -> None:
    text = json.dumps(value, indent=indent)
    decoded, spans = vd._decode_with_spans(text)
    assert decoded == json.loads(text)
    for key, (start, end) in spans.items():
        assert json.loads(text[start:end]) == value[key]
    for bad in ("{", '{"a" 1}', '{"a": 1,}', '{"a": 1} x', "[1,"):
        with pytest.raises(ValueError):
            vd._decode_with_spans(bad)


def test_decode_with_spans_reuses_unchanged_values_only() -> None:
    known: dict = {}
    tools = [{"name": "t" * 600}]
    first, _ = vd._decode_with_spans(json.dumps({"model": "m", "tools": tools}), known)
    again, _ = vd._decode_with_spans(json.dumps({"tools": tools, "model": "n"}), known)
    assert again["tools"] is first["tools"] and again["model"] == "n"
    longer = [*tools, {"name": "u"}]
    changed, _ = vd._decode_with_spans(json.dumps({"tools": longer}), known)
    assert changed["tools"] == longer
    prefix_text = json.dumps({"tools": longer})[:-1] + ', "x": 1}'
    assert vd._decode_with_spans(prefix_text, known)[0] == {"tools": longer, "x": 1}


async def test_unchanged_tools_are_converted_once_and_spliced(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    body = {**BASIC, "tools": [BASH_TOOL, {"name": "mcp__server__a_really_long_tool_name_" + "x" * 60,
                                           "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}}
    for _ in range(2):
        assert (await client.post("/v1/messages", json=body)).status == 200
    first, second = (r["body"] for r in upstream.requests[-2:])
    assert first == second and first["tool_choice"] == "required"
    assert first["tools"][0]["function"]["name"] == "Bash"
    assert len(first["tools"][1]["function"]["name"]) <= 64
    app_runtime = client.server.app[vd.RUNTIME]
    assert len(app_runtime.converted_tools) == 1


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_sse_decoder_split_invariance_on_any_bytes(data: bytes, cuts: list) -> None:
    whole = vd.SSEDecoder()
    expected = whole.feed(data) + whole.close()
    decoder, got, last = vd.SSEDecoder(), [], 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        got += decoder.feed(data[last:cut])
        last = cut
    assert got + decoder.feed(data[last:]) + decoder.close() == expected


# ---------------------------------------------------------------------------
# §13 HTTP: the proxy end to end against fake upstreams
# ---------------------------------------------------------------------------

async def test_text_conversation_json(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    response = await client.post("/v1/messages?beta=true", json=BASIC, headers={"x-api-key": "client-key"})
    message = await response.json()
    assert response.status == 200, message
    assert message["content"] == [{"type": "text", "text": "Hello there"}]
    assert message["model"] == "claude-sonnet-5-5" and message["usage"]["input_tokens"] == 12
    sent = upstream.last
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "gpt-5.1"
    assert sent["headers"]["authorization"] == "Bearer sk-test-0000000000001"
    assert "x-api-key" not in sent["headers"]
    assert response.headers["request-id"] == sent["headers"]["x-request-id"]


async def test_text_conversation_stream(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    response, frames = await post_stream(client, BASIC)
    assert response.headers["request-id"] == upstream.last["headers"]["x-request-id"]
    message = final_message(frames)
    assert message["content"] == [{"type": "text", "text": "Hello there"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["output_tokens"] == 7
    assert frames[0][1]["message"]["usage"]["input_tokens"] >= 1
    assert upstream.last["body"]["stream_options"] == {"include_usage": True}


async def test_message_start_estimate_counts_images_not_their_bytes(proxy: Any) -> None:
    client = await proxy()
    big = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 400_000}}
    question = user([big, {"type": "text", "text": "what is it?"}])
    _r, frames = await post_stream(client, {**BASIC, "messages": [question]})
    estimate = frames[0][1]["message"]["usage"]["input_tokens"]
    assert vd._IMAGE_TOKENS <= estimate < vd._IMAGE_TOKENS + 500


async def test_request_id_from_client_is_kept(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    response = await client.post("/v1/messages", json=BASIC, headers={"x-request-id": "abc-123"})
    assert response.headers["request-id"] == "abc-123" and upstream.last["headers"]["x-request-id"] == "abc-123"


@pytest.mark.parametrize(("status", "body", "expected_status", "expected_type"), [
    pytest.param(400, {"error": {"message": "bad thing", "type": "invalid_request_error"}}, 400,
                 "invalid_request_error", id="400"),
    pytest.param(401, {"error": {"message": "bad key"}}, 401, "authentication_error", id="401"),
    pytest.param(403, {"error": {"message": "region"}}, 403, "permission_error", id="403"),
    pytest.param(404, {"error": {"code": "404", "message": "Resource not found"}}, 404, "not_found_error",
                 id="404-azure"),
    pytest.param(413, {"error": {"message": "too big"}}, 413, "request_too_large", id="413"),
    pytest.param(422, {"detail": "unprocessable"}, 400, "invalid_request_error", id="422"),
    pytest.param(429, {"error": {"message": "slow down"}}, 429, "rate_limit_error", id="429"),
    pytest.param(500, {"error": {"message": "oops"}}, 500, "api_error", id="500"),
    pytest.param(503, [{"error": {"message": "unavailable", "status": "UNAVAILABLE"}}], 503, "overloaded_error",
                 id="503-gemini-list"),
    pytest.param(529, "not json at all", 529, "overloaded_error", id="529-text"),
])
async def test_upstream_errors_map_to_anthropic(proxy: Any, upstream: FakeUpstream, status: int, body: Any,
                                                expected_status: int, expected_type: str) -> None:
    client = await proxy()
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    for stream in (False, True):
        upstream.add(Reply(raw, status=status, headers={"retry-after": "7"}))
        response = await client.post("/v1/messages", json={**BASIC, "stream": stream})
        data = await response.json()
        assert response.status == expected_status
        assert data["type"] == "error" and data["error"]["type"] == expected_type
        assert data["error"]["message"].startswith("openai: ")
        assert response.headers.get("retry-after") == "7"


def strict_json(text: str) -> Any:
    """JSON as a strict client reads it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} is not JSON"))


@pytest.mark.parametrize(("reply", "status", "fragment"), [
    pytest.param(Reply({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "inf"}), 429,
                 "slow down", id="retry-after-infinite"),
    pytest.param(Reply(b"[" * 5000, status=400), 400, "[[[", id="error-nested-beyond-the-decoder"),
    pytest.param(Reply(b'{"choices": ' + b"[" * 5000), 502, "invalid JSON", id="answer-nested-beyond-the-decoder"),
    pytest.param(Reply({"choices": [{"message": {"tool_calls": [{"id": "c1", "function": {
        "name": "f", "arguments": '{"x": NaN, "y": Infinity}'}}]}, "finish_reason": "tool_calls"}]}), 200,
                 "_raw_arguments", id="tool-arguments-with-nan"),
    pytest.param(Reply({"choices": [{"message": {"tool_calls": [{"id": "c1", "function": {
        "name": "f", "arguments": '{"n": 1e999}'}}]}, "finish_reason": "tool_calls"}]}), 200,
                 "_raw_arguments", id="tool-arguments-beyond-a-float"),
    pytest.param(Reply(b'\xef\xbb\xbf{"error": {"message": "quota exceeded"}}', status=429), 429,
                 '"openai: quota exceeded"', id="error-body-with-a-byte-order-mark"),
])
async def test_hostile_upstream_answers_are_clean_anthropic_answers(proxy: Any, upstream: FakeUpstream, reply: Reply,
                                                                    status: int, fragment: str) -> None:
    client = await proxy({"MAX_RETRIES": "0"})
    upstream.add(reply)
    response = await client.post("/v1/messages", json=BASIC)
    data = strict_json(await response.text())
    assert response.status == status and response.headers["request-id"]
    assert "retry-after" not in response.headers
    assert fragment in json.dumps(data["error"]["message"] if status >= 400 else data["content"])


@pytest.mark.parametrize(("data", "fragment"), [
    pytest.param(b"{not json", "not valid JSON", id="bad-json"),
    pytest.param(b"[]", "JSON object", id="not-object"),
    pytest.param(b'{"messages": []}', "model", id="missing-model"),
    pytest.param(b'{"model": "m"}', "messages", id="missing-messages"),
    pytest.param(b'{"model": "m", "messages": [], "temperature": 1e999}', "out of range", id="number-beyond-a-float"),
    pytest.param(b'{"model": "m", "messages": [], "max_tokens": -1}', "max_tokens", id="negative-max-tokens"),
    pytest.param(b'{"model": "m", "messages": [{"role": "user", "content": {"a": 1}}]}', "messages.0.content",
                 id="wrong-content-type"),
])
async def test_client_mistakes_are_anthropic_400(proxy: Any, data: bytes, fragment: str) -> None:
    client = await proxy()
    response = await client.post("/v1/messages", data=data, headers={"Content-Type": "application/json"})
    body = await response.json()
    assert response.status == 400 and body["error"]["type"] == "invalid_request_error"
    assert fragment in body["error"]["message"] and "Traceback" not in body["error"]["message"]


async def test_unknown_path_and_method_are_anthropic_errors(proxy: Any) -> None:
    client = await proxy()
    response = await client.get("/v2/whatever")
    assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"
    response = await client.get("/v1/messages")
    assert response.status == 405 and (await response.json())["type"] == "error"


async def test_claude_code_side_endpoints(proxy: Any) -> None:
    client = await proxy()
    for method, path in (("HEAD", "/"), ("HEAD", "/api/hello"), ("POST", "/api/event_logging/batch")):
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status == 200, path


async def test_request_too_large_is_413(proxy: Any) -> None:
    client = await proxy(max_request_bytes=1000)
    response = await client.post("/v1/messages", json={**BASIC, "messages": [user("x" * 5000)]})
    body = await response.json()
    assert response.status == 413 and body["error"]["type"] == "request_too_large"
    assert "MAX_REQUEST_BYTES" in body["error"]["message"]


async def test_oversized_headers_are_refused_and_the_server_keeps_serving(proxy: Any) -> None:
    client = await proxy()
    response = await client.post("/v1/messages", json=BASIC, headers={"X-Huge": "a" * 20_000})
    assert response.status in (400, 431)
    assert (await client.post("/v1/messages", json=BASIC)).status == 200


async def test_no_provider_configured_answers_with_the_variable_to_set(aiohttp_client: Any) -> None:
    client = await aiohttp_client(vd.create_app(make_config({})))
    health = await (await client.get("/health")).json()
    assert health["status"] == "no_providers" and health["providers"] == []
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 500 and "OPENAI_API_KEY" in body["error"]["message"]
    assert response.headers["x-should-retry"] == "false"


async def test_key_rotation_and_failover(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_API_KEY": "key-one-000000 key-two-000000 key-three-0000"})
    upstream.add(Reply({"error": {"message": "bad key"}}, status=401),
                 Reply({"error": {"message": "slow"}}, status=429, headers={"retry-after": "30"}))
    response = await client.post("/v1/messages", json=BASIC)
    assert response.status == 200
    used = [r["headers"]["authorization"] for r in upstream.requests]
    assert used == ["Bearer key-one-000000", "Bearer key-two-000000", "Bearer key-three-0000"]
    await client.post("/v1/messages", json=BASIC)       # the failed keys are cooling down
    assert upstream.last["headers"]["authorization"] == "Bearer key-three-0000"
    health = await (await client.get("/health")).json()
    assert health["providers"][0]["cooling_keys"] == 2 and health["providers"][0]["keys"] == 3
    assert "key-one" not in json.dumps(health)


async def test_all_keys_failing_returns_last_error_with_retry_after(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_API_KEY": "key-a-0000000000 key-b-0000000000"})
    upstream.add(Reply({"error": {"message": "limit a"}}, status=429, headers={"retry-after": "3"}),
                 Reply({"error": {"message": "limit b"}}, status=429, headers={"retry-after": "9"}))
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 429 and body["error"]["message"] == "openai: limit b"
    assert response.headers["retry-after"] == "9" and len(upstream.requests) == 2


async def test_proxy_api_key_required_and_passthrough_takes_the_other_header(proxy: Any,
                                                                             upstream: FakeUpstream) -> None:
    client = await proxy({"PROXY_API_KEY": "proxy-secret-1234", "PT_API_KEY": "!PASSTHRU",
                          "PT_BASE_URL": "{upstream}/v1"})
    body = {**BASIC, "model": "pt:some-model"}
    response = await client.post("/v1/messages", json=body)
    assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"
    response = await client.post("/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert response.status == 401
    assert (await client.get("/metrics/running-totals")).status == 401
    assert (await client.get("/health")).status == 200
    # Claude Code: ANTHROPIC_API_KEY (x-api-key) = proxy key, ANTHROPIC_AUTH_TOKEN (Bearer) = upstream key
    response = await client.post("/v1/messages", json=body, headers={"x-api-key": "proxy-secret-1234",
                                                                      "Authorization": "Bearer user-upstream-key"})
    assert response.status == 200
    assert upstream.last["headers"]["authorization"] == "Bearer user-upstream-key"
    # and the other way round
    response = await client.post("/v1/messages", json=body, headers={"x-api-key": "user-key-2",
                                                                      "Authorization": "Bearer proxy-secret-1234"})
    assert response.status == 200 and upstream.last["headers"]["authorization"] == "Bearer user-key-2"


async def test_passthrough_without_client_key_is_401(proxy: Any) -> None:
    client = await proxy({"OPENAI_API_KEY": "!PASSTHRU"})
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 401 and "PASSTHRU" in body["error"]["message"]


async def test_static_keys_never_forward_client_credentials(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    await client.post("/v1/messages", json=BASIC, headers={"x-api-key": "client-secret", "Authorization": "Bearer cs2",
                                                           "Cookie": "a=b", "X-Custom": "1"})
    headers = upstream.last["headers"]
    assert headers["authorization"] == "Bearer sk-test-0000000000001"
    assert "client-secret" not in json.dumps(headers) and "cs2" not in json.dumps(headers)
    assert "cookie" not in headers and "x-custom" not in headers


async def test_custom_headers_reach_the_provider(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_CUSTOM_HEADER_X_USER_ID": "team-7"})
    await client.post("/v1/messages", json=BASIC)
    assert upstream.last["headers"]["x-user-id"] == "team-7"


async def test_count_tokens_endpoint(proxy: Any) -> None:
    client = await proxy()
    body = {"model": "claude-sonnet-4", "messages": [user("Hello, how are you today?")], "tools": [BASH_TOOL]}
    first = await (await client.post("/v1/messages/count_tokens?beta=true", json=body)).json()
    second = await (await client.post("/v1/messages/count_tokens", json=body)).json()
    assert first == second and first["input_tokens"] > 20
    empty = await (await client.post("/v1/messages/count_tokens", json={"model": "m", "messages": []})).json()
    assert empty["input_tokens"] >= 1


async def test_models_and_aliases_endpoints(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_ALIAS_FAST": "gpt-fast"})
    models = await (await client.get("/v1/models")).json()
    ids = [m["id"] for m in models["data"]]
    assert "fast" in ids and "sonnet" in ids and "openai:model-a" in ids
    assert models["has_more"] is False and models["first_id"] == ids[0] and models["last_id"] == ids[-1]
    await client.get("/v1/models")
    assert sum(1 for r in upstream.requests if r["path"].endswith("/models")) == 1     # cached
    aliases = await (await client.get("/v1/aliases")).json()
    fast = next(a for a in aliases["aliases"] if a["name"] == "fast")
    assert fast == {"provider": "openai", "name": "fast", "target": "gpt-fast", "source": "env"}


ROUTING_SCENARIOS = [
    pytest.param({"DEEPSEEK_API_KEY": "sk-ds-000000000001"}, id="default-with-aliases-and-another"),
    pytest.param({"VDM_DEFAULT_PROVIDER": "local", "LOCAL_BASE_URL": "{upstream}/local/v1",
                  "DEEPSEEK_API_KEY": "sk-ds-000000000001"}, id="default-without-aliases"),
    pytest.param({"DEEPSEEK_API_KEY": "sk-ds-000000000001", "GROQ_API_KEY": "gsk-000000000001",
                  "GROQ_ALIAS_SONNET": "llama-big", "DEEPSEEK_ALIAS_OPUS": "deepseek-reasoner"},
                 id="same-alias-several-providers"),
    pytest.param({"DEEPSEEK_API_KEY": "sk-ds-000000000001", "OPENAI_ALIAS_FAST": "deepseek:deepseek-chat",
                  "DEEPSEEK_ALIAS_SONNET": "openai:gpt-4o-mini"}, id="prefixed-aliases"),
    pytest.param({"DEEPSEEK_API_KEY": "sk-ds-000000000001", "OPENAI_ALIAS_BIG": "gpt-5.1, deepseek:deepseek-chat",
                  "OPENAI_ALIAS_CHAIN": "big"}, id="fallback-chains"),
    pytest.param({"OLLAMA_BASE_URL": "{upstream}/ollama/v1", "OLLAMA_ALIAS_CODER": "qwen2.5-coder:7b",
                  "VDM_DEFAULT_PROVIDER": "ollama"}, id="ollama-names"),
]


@pytest.mark.parametrize("env", ROUTING_SCENARIOS)
async def test_every_listed_name_routes_where_the_listing_says(proxy: Any, upstream: FakeUpstream, env: dict) -> None:
    """/v1/models and /v1/aliases come from the router itself: a request for a listed name lands on the listed
    provider and model (the first of a fallback chain), for every name, in every configuration."""
    client = await proxy({"OPENAI_BASE_URL": "{upstream}/openai/v1", "DEEPSEEK_BASE_URL": "{upstream}/deepseek/v1",
                          "GROQ_BASE_URL": "{upstream}/groq/v1", **env})
    listed = {m["id"]: m["display_name"] for m in (await (await client.get("/v1/models")).json())["data"]}
    routes = {r["name"]: r["targets"][0] for r in (await (await client.get("/v1/aliases")).json())["routes"]}
    assert routes and set(routes) <= set(listed)
    for name, shown in listed.items():
        if " -> " in shown:
            provider, _, model = shown.split(" -> ")[1].split(", then ")[0].partition(":")
        else:                                               # a provider's own model, listed as provider:model
            provider, _, model = name.partition(":")
        if name in routes:
            assert routes[name] == {"provider": provider, "model": model}, name
        response = await client.post("/v1/messages", json={**BASIC, "model": name})
        assert response.status == 200, (name, await response.text())
        assert upstream.last["path"] == f"/{provider}/v1/chat/completions", (name, shown)
        assert upstream.last["body"]["model"] == model, (name, shown)


async def test_sdk_model_list_ids_route_as_listed(proxy: Any, upstream: FakeUpstream) -> None:
    if anthropic is None:
        pytest.skip("the anthropic SDK is not installed (pip install anthropic)")
    client = await proxy({"DEEPSEEK_API_KEY": "sk-ds-000000000001", "DEEPSEEK_BASE_URL": "{upstream}/deepseek/v1",
                          "OPENAI_BASE_URL": "{upstream}/openai/v1"})
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="any", max_retries=0)
    models = [m async for m in sdk.models.list()]
    assert {"sonnet", "openai:sonnet", "deepseek:sonnet"} <= {m.id for m in models}
    for model in models:
        message = await sdk.messages.create(model=model.id, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        target = model.display_name.split(" -> ")[-1].split(", then ")[0] if " -> " in model.display_name \
            else model.id
        assert f"/{target.partition(':')[0]}/v1/" in upstream.last["path"] and message.model == model.id
        assert upstream.last["body"]["model"] == target.partition(":")[2]


LIMIT_MESSAGES = [
    pytest.param("max_tokens is too large: 32000. This model supports at most 16384 completion tokens, whereas you "
                 "provided 32000.", 16384, True, id="openai"),
    pytest.param("Invalid max_tokens value, the valid range of max_tokens is [1, 8192]", 8192, True, id="deepseek"),
    pytest.param("`max_tokens` must be less than or equal to `16384`, the maximum value for `max_tokens` is less than "
                 "the `context_window` for this model", 16384, True, id="groq"),
    pytest.param("max_tokens for `llama-3.1-8b-instant` must be less than or equal to 8000", 8000, True, id="groq-old"),
    pytest.param("The parameter `max_completion_tokens` specified in the request are not valid: integer above maximum "
                 "value, expected a value <= 12288, but got 32000 instead.", 12288, True, id="volcengine"),
    pytest.param("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context length is "
                 "32768 tokens and your request has 1000 input tokens (32000 > 32768 - 1000).", 31768, False,
                 id="vllm-context"),
    pytest.param("This model's maximum context length is 8192 tokens. However, you requested 8256 tokens (64 in the "
                 "messages, 8192 in the completion).", 8128, False, id="openai-context"),
]


@pytest.mark.parametrize(("message", "limit", "per_model"), LIMIT_MESSAGES)
def test_stated_output_limits(message: str, limit: int, per_model: bool) -> None:
    assert vd.stated_output_limit(message) == (limit, per_model)
    assert vd.stated_output_limit("Incorrect API key provided") is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("message", "limit", "per_model"), LIMIT_MESSAGES)
async def test_over_limit_max_tokens_is_retried_once_then_capped(proxy: Any, upstream: FakeUpstream, message: str,
                                                                 limit: int, per_model: bool, stream: bool) -> None:
    client = await proxy()
    body = {**BASIC, "model": "openai:gpt-4o", "max_tokens": 32000, "stream": stream}
    for _ in range(2):
        upstream.add(Reply({"error": {"message": message, "type": "invalid_request_error"}}, status=400))
        response = await client.post("/v1/messages", json=body)
        assert response.status == 200, await response.text()
        assert "Hello" in await response.text()
        assert [r["body"]["max_tokens"] for r in upstream.requests[-2:]] == [32000, limit]
        if per_model:
            break
        upstream.requests.clear()
    if per_model:                                        # learned: the next request goes out capped at once
        upstream.requests.clear()
        assert (await client.post("/v1/messages", json=body)).status == 200
        assert [r["body"]["max_tokens"] for r in upstream.requests] == [limit]
    health = await (await client.get("/health")).json()
    assert health["output_limits"] == ({"openai:gpt-4o": limit} if per_model else {})


async def test_configured_output_limits_win(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_MAX_TOKENS": "gpt-4o*=1000, o3=2000", "MAX_TOKENS_LIMIT": "5000"})
    for model, sent in (("openai:gpt-4o-mini", 1000), ("openai:o3", 2000), ("openai:other", 5000)):
        await client.post("/v1/messages", json={**BASIC, "model": model, "max_tokens": 32000})
        body = upstream.last["body"]
        assert body.get("max_tokens", body.get("max_completion_tokens")) == sent, model


async def test_health_shape(proxy: Any) -> None:
    client = await proxy()
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["version"] == vd.__version__ and health["default_provider"] == "openai"
    assert health["providers"][0]["format"] == "openai" and health["providers"][0]["keys"] == 1
    assert "sk-test" not in json.dumps(health) and 0 <= health["uptime_s"] < 60


async def test_tool_round_trip_through_proxy(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(stream=sse(delta(role="assistant", content="Running"),
                                  delta(tool_calls=[tc(0, "call_9", "Bash", "")]),
                                  delta(tool_calls=[tc(0, args='{"command":')]),
                                  delta(tool_calls=[tc(0, args=' "ls"}')]), finish("tool_calls"), usage_chunk())))
    _response, frames = await post_stream(client, {**BASIC, "tools": [BASH_TOOL]})
    message = final_message(frames)
    assert message["stop_reason"] == "tool_use"
    tool = message["content"][1]
    assert tool == {"type": "tool_use", "id": "call_9", "name": "Bash", "input": {"command": "ls"}}
    turn2 = {**BASIC, "tools": [BASH_TOOL], "messages": [
        user("list"), assistant(message["content"]),
        user([{"type": "tool_result", "tool_use_id": "call_9", "content": "a.txt",
               "cache_control": {"type": "ephemeral"}}])]}
    response = await client.post("/v1/messages", json=turn2)
    assert response.status == 200
    sent = upstream.last["body"]["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_9", "content": "a.txt"}
    assert sent[-2]["tool_calls"][0]["function"] == {"name": "Bash", "arguments": '{"command": "ls"}'}


async def test_stream_cut_after_start_ends_with_error_event(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(stream=[sse(delta(content="partial"), done=False), b"<reset>"]))
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    text = await response.text()
    frames = validate_stream(text)
    assert frames[-1][0] == "error" and frames[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in text


async def test_stream_in_band_upstream_error_event(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(stream=sse(delta(content="a"), {"error": {"message": "provider exploded"}})))
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = validate_stream(await response.text())
    assert frames[-1][0] == "error" and "provider exploded" in frames[-1][1]["error"]["message"]


async def test_stream_without_done_or_finish_still_ends_cleanly(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(stream=[b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n: keep-alive\n\n',
                               b'data: {"choices":[{"delta":{"content":"b"}}]}']))
    _response, frames = await post_stream(client, BASIC)
    assert final_message(frames)["content"] == [{"type": "text", "text": "ab"}]


async def test_last_unterminated_event_still_runs_the_chunk_hooks(proxy: Any, upstream: FakeUpstream) -> None:
    """A stream cut without a blank line or [DONE]: its last event goes through on_upstream_chunk too."""
    class Upper(vd.Middleware):
        def on_upstream_chunk(self, exchange: Any, chunk: dict) -> None:
            for choice in chunk.get("choices") or ():
                choice["delta"]["content"] = choice["delta"]["content"].upper()

    client = await proxy(middleware=[Upper()])
    upstream.add(Reply(stream=[b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                               b'data: {"choices":[{"delta":{"content":"b"}}]}']))
    _response, frames = await post_stream(client, BASIC)
    assert final_message(frames)["content"] == [{"type": "text", "text": "AB"}]


async def test_stream_request_answered_with_json_is_still_a_stream(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(completion("Plain JSON", reasoning_content="thought", tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}])))
    _r, frames = await post_stream(client, BASIC)
    message = final_message(frames)
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][2]["input"] == {"command": "ls"} and message["stop_reason"] == "tool_use"
    assert message["usage"]["output_tokens"] == 5
    upstream.add(Reply(b"{broken"))
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    body = await response.json()                     # decided before the stream started: a real status
    assert response.status == 502 and "invalid JSON" in body["error"]["message"]


async def test_stream_garbage_lines_and_split_bytes(proxy: Any, upstream: FakeUpstream) -> None:
    body = sse(delta(content="héllo "), b"data: {broken json\n\n", b"nonsense line\n\n", delta(content="wörld"),
               finish())
    upstream.add(Reply(stream=[body[i:i + 3] for i in range(0, len(body), 3)]))
    client = await proxy()
    _response, frames = await post_stream(client, BASIC)
    assert final_message(frames)["content"] == [{"type": "text", "text": "héllo wörld"}]


async def test_ping_during_upstream_silence(proxy: Any, upstream: FakeUpstream, monkeypatch: Any) -> None:
    monkeypatch.setattr(vd, "_PING_INTERVAL", 0.3)
    upstream.add(Reply(stream=[sse(delta(content="a"), done=False), sse(delta(content="b"), finish())],
                       chunk_delay=0.9))
    client = await proxy()
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = validate_stream(await response.text())
    names = [n for n, _ in frames]
    first_delta = names.index("content_block_delta")
    assert "ping" in names[first_delta:], names


async def test_stream_idle_timeout_closes_with_error(proxy: Any, upstream: FakeUpstream, monkeypatch: Any) -> None:
    monkeypatch.setattr(vd, "_PING_INTERVAL", 0.3)
    upstream.add(Reply(stream=[sse(delta(content="a"), done=False)], hang=5))
    client = await proxy(stream_idle_timeout=0.5)
    started = time.monotonic()
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = validate_stream(await response.text())
    assert frames[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "openai: stream interrupted: no data for STREAM_IDLE_TIMEOUT=0.5s"}})
    assert time.monotonic() - started < 3


async def test_first_byte_timeout_is_504(proxy: Any, upstream: FakeUpstream) -> None:
    upstream.add(Reply(completion("late"), delay=2))
    client = await proxy(request_timeout=0.3)
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 504 and "REQUEST_TIMEOUT" in body["error"]["message"]


async def test_pool_exhaustion_is_a_prompt_overloaded_error(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy(pool_limit=1, connect_timeout=0.5)
    gate = asyncio.Event()
    upstream.add(Reply(completion("slow"), gate=gate))
    first = asyncio.create_task(client.post("/v1/messages", json=BASIC))
    try:
        await until(lambda: upstream.active == 1)           # the only pooled connection is taken
        started = time.monotonic()
        response = await client.post("/v1/messages", json=BASIC)
        body = await response.json()
        assert response.status == 529 and body["error"]["type"] == "overloaded_error"
        assert "POOL_LIMIT" in body["error"]["message"] and time.monotonic() - started < 2.5
    finally:
        gate.set()
    assert (await first).status == 200


async def test_unreachable_upstream_is_502(proxy: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = await proxy({"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 502 and body["error"]["type"] == "api_error"
    assert "cannot reach" in body["error"]["message"]


# Found by a second review: failures at the edges of the relays.

ANTHROPIC_ENV = {"ANTHROPIC_API_KEY": "sk-ant-000000000001", "ANTHROPIC_BASE_URL": "{upstream}",
                 "VDM_DEFAULT_PROVIDER": "anthropic"}
MESSAGE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                 b'"role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
                 b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n')


async def test_a_failure_of_our_own_mid_stream_is_an_sse_error(proxy: Any, upstream: FakeUpstream) -> None:
    class Garbage(vd.Middleware):          # a hook that returns an event without a delta type
        def on_event(self, exchange: Any, event: dict) -> Any:
            if event["event"] == "content_block_delta":
                return {"event": "content_block_delta", "data": {"type": "content_block_delta", "index": 0,
                                                                 "delta": {}}}
            return None

    client = await proxy(middleware=[Garbage()])
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    frames = parse_sse(await response.text())
    assert response.status == 200 and frames[-1][0] == "error"
    assert frames[-1][1]["error"]["message"] == "internal error in vandamme; see its log"


async def test_anthropic_relay_cut_mid_event_ends_with_a_whole_error_event(proxy: Any,
                                                                           upstream: FakeUpstream) -> None:
    client = await proxy(ANTHROPIC_ENV)
    half = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"hel')
    upstream.add(Reply(stream=[MESSAGE_START, half, b"<reset>"]))
    response = await client.post("/v1/messages", json={**BASIC, "model": "claude-x", "stream": True})
    text = await response.text()
    frames = parse_sse(text)                       # every frame parses: no error glued to half an event
    assert [name for name, _ in frames] == ["message_start", "error"] and '"text":"hel' not in text


async def test_anthropic_relay_has_an_idle_timeout(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({**ANTHROPIC_ENV, "STREAM_IDLE_TIMEOUT": "0.5"})
    upstream.add(Reply(stream=[MESSAGE_START], hang=5))
    response = await client.post("/v1/messages", json={**BASIC, "model": "claude-x", "stream": True})
    frames = parse_sse(await response.text())          # worded as the translated stream words it
    assert frames[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "anthropic: stream interrupted: no data for STREAM_IDLE_TIMEOUT=0.5s"}})


@pytest.mark.parametrize("stream", [True, False])
async def test_anthropic_relay_relays_usage_it_cannot_decode(proxy: Any, upstream: FakeUpstream, stream: bool) -> None:
    # Usage nested too deeply for json.loads (RecursionError, not a ValueError) only goes uncounted: the
    # provider's bytes still reach the client whole, and the request is no failure.
    nested = b'{"type":"message_delta","delta":{},"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    client = await proxy(ANTHROPIC_ENV)
    upstream.add(Reply(stream=[MESSAGE_START, b"event: message_delta\ndata: " + nested + b"\n\n"]) if stream
                 else Reply(nested))
    response = await client.post("/v1/messages", json={**BASIC, "model": "claude-x", "stream": stream})
    body = await response.read()
    assert response.status == 200
    assert body == (MESSAGE_START + b"event: message_delta\ndata: " + nested + b"\n\n" if stream else nested)
    totals = await (await client.get("/metrics/running-totals")).json()
    assert totals["totals"]["requests"] == 1 and totals["totals"]["errors_by_type"] == {}
    assert totals["totals"]["input_tokens"] == (3 if stream else 0)


@pytest.mark.parametrize(("reply", "verbatim"), [
    pytest.param(Reply(b"<html><body>Bad Gateway</body></html>", status=502, headers={"Content-Type": "text/html"}),
                 False, id="html-page"),
    pytest.param(Reply({"detail": "Not Found"}, status=404), False, id="other-json"),
    pytest.param(Reply({"type": "error", "error": {"type": "invalid_request_error", "message": "bad field x"}},
                       status=400), True, id="anthropic-error"),
])
async def test_anthropic_relay_passes_on_only_anthropic_errors(proxy: Any, upstream: FakeUpstream, reply: Reply,
                                                               verbatim: bool) -> None:
    client = await proxy(ANTHROPIC_ENV)
    upstream.add(reply)
    response = await client.post("/v1/messages", json={**BASIC, "model": "claude-x"})
    body = await response.json()
    assert response.status == reply.status and body["type"] == "error" and body["error"]["message"]
    assert (body == reply.body) is verbatim


async def test_a_stream_answered_by_a_cut_json_is_a_502(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply(stream=[b'{"id": "x", "choices": [', b"<reset>"], headers={"Content-Type": "application/json"}))
    response = await client.post("/v1/messages", json={**BASIC, "stream": True})
    body = await response.json()
    assert response.status == 502 and "the answer was cut" in body["error"]["message"]


async def test_a_generation_that_runs_out_of_time_is_not_sent_again(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"REQUEST_TIMEOUT": "0.5", "MAX_RETRIES": "2"})
    upstream.add(Reply(stream=[b'{"id": "x", '], hang=3, headers={"Content-Type": "application/json"}))
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 504 and response.headers["x-should-retry"] == "false"
    assert "did not complete within REQUEST_TIMEOUT" in body["error"]["message"] and len(upstream.requests) == 1


async def test_the_proxy_key_is_never_forwarded_as_a_client_key(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"PROXY_API_KEY": "proxy-secret-123456", "PT_API_KEY": "!PASSTHRU",
                          "PT_BASE_URL": "{upstream}/v1"})
    both = {"x-api-key": "proxy-secret-123456", "Authorization": "Bearer proxy-secret-123456"}
    response = await client.post("/v1/messages", json={**BASIC, "model": "pt:m"}, headers=both)
    assert response.status == 401 and upstream.requests == []


async def test_a_learned_limit_caps_a_higher_configured_one(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MAX_TOKENS_LIMIT": "50000"})
    upstream.add(Reply({"error": {"message": "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"}},
                       status=400))
    body = {**BASIC, "model": "openai:gpt-4o", "max_tokens": 64000}
    for _ in range(2):
        assert (await client.post("/v1/messages", json=body)).status == 200
    assert [r["body"]["max_tokens"] for r in upstream.requests] == [50000, 8192, 8192]


async def test_odd_upstream_model_entries_do_not_break_the_listing(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    upstream.add(Reply({"data": [{"id": ""}, {"id": "x" * 300}, {"id": "ok", "created": 10 ** 18}, {"id": 7}]}))
    response = await client.get("/v1/models")
    ids = [m["id"] for m in (await response.json())["data"]]
    assert response.status == 200 and "openai:ok" in ids and not any(i.startswith("openai:x") for i in ids)



# ---------------------------------------------------------------------------
# §13 Security: secrets, redirects, limits, routes, hostile input
# ---------------------------------------------------------------------------

SECRET_CASES = [
    pytest.param({"OPENAI_API_KEY": "sk-live-0123456789abcdef", "OPENAI_BASE_URL": "{upstream}/v1"}, "openai:gpt-4o",
                 {}, ["sk-live-0123456789abcdef"], id="openai"),
    pytest.param({"AZ_API_KEY": "az-secret-0123456789", "AZ_BASE_URL": "{upstream}", "AZ_API_VERSION": "2024-10-21"},
                 "az:deploy", {}, ["az-secret-0123456789"], id="azure"),
    pytest.param({"CH_API_KEY": "ch-key-0123456789ab", "CH_BASE_URL": "{upstream}/v1",
                  "CH_CUSTOM_HEADER_X_TENANT": "tenant-secret-42424242"}, "ch:m", {},
                 ["ch-key-0123456789ab", "tenant-secret-42424242"], id="custom-header"),
    pytest.param({"PT_API_KEY": "!PASSTHRU", "PT_BASE_URL": "{upstream}/v1"}, "pt:m",
                 {"x-api-key": "client-own-key-9876543210"}, ["client-own-key-9876543210"], id="passthru"),
]


def echo_upstream(mode: str) -> web.Application:
    """An upstream that repeats every header it got in its error, as OpenAI does with a wrong key."""
    async def handle(request: web.Request) -> web.StreamResponse:
        echoed = " ".join(f"{k}={v}" for k, v in request.headers.items())
        if mode == "inband":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(sse(delta(content="hi"), {"error": {"message": f"bad key: {echoed}"}}, done=False))
            return response
        return web.json_response({"error": {"message": f"Incorrect API key provided: {echoed}"}}, status=401)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.mark.parametrize("mode", ["json", "stream", "inband"])
@pytest.mark.parametrize(("env", "model", "headers", "secrets"), SECRET_CASES)
async def test_an_echoed_key_never_leaves(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, caplog: Any,
                                          env: dict, model: str, headers: dict, secrets: list, mode: str) -> None:
    echo = await aiohttp_server(echo_upstream(mode))
    url = str(echo.make_url("")).rstrip("/")
    config = make_config({"REQUEST_TIMEOUT": "5", "MAX_RETRIES": "0",
                          **{k: v.replace("{upstream}", url) for k, v in env.items()}}, tmp_path)
    client = await aiohttp_client(vd.create_app(config))
    caplog.set_level(logging.INFO)
    response = await client.post("/v1/messages", json={**BASIC, "model": model, "stream": mode != "json"},
                                 headers=headers)
    answer = await response.text()
    assert ("bad key" if mode == "inband" else "Incorrect API key") in answer
    outputs = [answer, caplog.text]
    for path in ("/metrics/running-totals", "/metrics", "/health"):
        outputs.append(await (await client.get(path, headers=headers)).text())
    assert "Incorrect API key" in outputs[2] or "bad key" in outputs[2]       # the error is reported, masked
    for secret in secrets:
        assert all(secret not in text for text in outputs), secret


async def test_base_url_user_info_and_query_are_masked(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"OPENAI_BASE_URL": "{upstream}/v1?token=query-secret-1234",
                          "X_BASE_URL": "http://user:userinfo-pass-9876@127.0.0.1:9/v1"})
    health = await (await client.get("/health")).text()
    assert "query-secret-1234" not in health and "userinfo-pass-9876" not in health and "x" in health


async def test_cli_output_and_startup_banner_mask_secrets(upstream: FakeUpstream, tmp_path: Path, capsys: Any) -> None:
    secrets = ["sk-cli-secret-0123456789", "pass-secret-4242", "qs-secret-8888", "hdr-secret-7777"]
    env = {"OPENAI_API_KEY": secrets[0], "OPENAI_BASE_URL": f"http://u:{secrets[1]}@127.0.0.1:9/v1?k={secrets[2]}",
           "OPENAI_CUSTOM_HEADER_X_TEAM": secrets[3], "HOME": str(tmp_path)}
    for argv in (["config", "show"], ["config", "validate"], ["resolve", "sonnet"]):
        vd.main(argv, environ=env)
        out = capsys.readouterr()
        assert all(secret not in out.out + out.err for secret in secrets), argv
    check = await asyncio.to_thread(subprocess.run, [sys.executable, str(HERE / "vandamme.py"), "check"],
                                    env={**env, "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)
    assert "openai" in check.stdout and all(secret not in check.stdout + check.stderr for secret in secrets)
    proc = ProxyProcess(HERE / "vandamme.py", {**env, "LOG_LEVEL": "DEBUG"}, tmp_path)
    try:
        await proc.wait_ready()
    finally:
        proc.stop()
    assert "listening on" in proc.log() and all(secret not in proc.log() for secret in secrets)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/models"])
async def test_upstream_redirects_are_never_followed(proxy: Any, upstream: FakeUpstream, path: str) -> None:
    client = await proxy()
    upstream.add(Reply({"error": "moved"}, status=302, headers={"Location": "http://evil.example/v1/steal"}))
    if path == "/v1/messages":
        response = await client.post(path, json=BASIC)
        body = await response.json()
        assert response.status == 502 and "evil.example" in body["error"]["message"]
        assert "openai" in body["error"]["message"] and response.headers["x-should-retry"] == "false"
    else:
        models = await (await client.get(path)).json()
        assert models["data"] and not any(m["id"].startswith("openai:model-") for m in models["data"])
    assert len(upstream.requests) == 1          # only the first hop: nothing went to the redirect's target


async def test_gzip_bomb_stops_at_the_response_cap(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MAX_RESPONSE_BYTES": str(1 << 20)})
    bomb = gzip.compress(b'{"choices": [' + b" " * (200 << 20) + b"]}", compresslevel=9)
    assert len(bomb) < 400_000
    upstream.add(Reply(bomb, headers={"Content-Encoding": "gzip"}))
    response = await client.post("/v1/messages", json=BASIC)
    body = await response.json()
    assert response.status == 502 and "MAX_RESPONSE_BYTES=1048576" in body["error"]["message"]


async def test_a_huge_sse_line_ends_at_the_cap_while_health_answers(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"MAX_RESPONSE_BYTES": str(4 << 20)})
    upstream.add(Reply(stream=[b'data: {"choices":[{"delta":{"content":"'] + [b"x" * 65536] * 640))   # 40 MiB line
    streaming = asyncio.create_task(client.post("/v1/messages", json={**BASIC, "stream": True}))
    assert (await client.get("/health")).status == 200
    response = await streaming
    frames = validate_stream(await response.text())
    assert frames[-1][0] == "error" and "MAX_RESPONSE_BYTES=4194304" in frames[-1][1]["error"]["message"]


GUARDED = [("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"),
           ("HEAD", "/v1/models"), ("GET", "/v1/aliases"), ("GET", "/metrics"), ("GET", "/metrics/running-totals"),
           ("POST", "/api/event_logging/batch"), ("DELETE", "/v1/messages"), ("GET", "/nowhere"),
           ("PUT", "/health"), ("HEAD", "/metrics")]


async def test_proxy_key_guards_every_route_but_the_public_ones(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"PROXY_API_KEY": "proxy-key-1234567890"})
    for method, path in GUARDED:
        response = await client.request(method, path, json=BASIC if method == "POST" else None)
        assert response.status == 401, (method, path, response.status)
    for method, path in [("HEAD", "/"), ("GET", "/"), ("HEAD", "/api/hello"), ("GET", "/api/hello")]:
        assert (await client.request(method, path)).status == 200, (method, path)
    assert await (await client.get("/health")).json() == {"status": "ok"}
    detailed = await (await client.get("/health", headers={"x-api-key": "proxy-key-1234567890"})).json()
    assert detailed["providers"][0]["name"] == "openai"
    assert upstream.requests == []


async def test_head_never_runs_a_get_handlers_work(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    assert (await client.head("/v1/models")).status == 405
    assert upstream.requests == []


@pytest.mark.parametrize(("data", "fragment"), [
    pytest.param(b'{"model": "m", "max_tokens": NaN, "messages": []}', "NaN is not JSON", id="nan"),
    pytest.param(b'{"model": "m", "temperature": -Infinity, "messages": []}', "Infinity is not JSON", id="infinity"),
    pytest.param(b'{"model": "m\xff", "messages": []}', "not valid UTF-8", id="utf8"),
    pytest.param(b'{"model": "m", "messages": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "nested too deeply",
                 id="deep"),
    pytest.param(json.dumps({**BASIC, "model": "a\r\nb"}).encode(), "model: must be", id="control-chars"),
    pytest.param(b'{"model": "\\ud800x", "messages": []}', "model: must be", id="lone-surrogate"),
    pytest.param(json.dumps({**BASIC, "model": "m" * 257}).encode(), "model: must be", id="too-long"),
])
async def test_hostile_bodies_are_400_and_never_forwarded(proxy: Any, upstream: FakeUpstream, data: bytes,
                                                           fragment: str) -> None:
    client = await proxy()
    response = await client.post("/v1/messages", data=data, headers={"Content-Type": "application/json"})
    body = await response.json()
    assert response.status == 400 and body["error"]["type"] == "invalid_request_error", body
    assert fragment in body["error"]["message"] and response.headers["x-should-retry"] == "false"
    assert upstream.requests == []


async def test_azure_deployment_is_one_path_segment(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy({"AZ_API_KEY": "k" * 20, "AZ_BASE_URL": "{upstream}", "AZ_API_VERSION": "2024-10-21"})
    await client.post("/v1/messages", json={**BASIC, "model": "az:../../admin?x=1#y"})
    deployment = "..%2F..%2Fadmin%3Fx=1%23y"                   # one segment: no ../, ? or # effect
    assert upstream.last["raw_path"] == f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"


@pytest.mark.parametrize("variable", ["OPENAI_CUSTOM_HEADER_X_ORG", "OPENAI_CUSTOM_HEADER_X_O(RG"])
def test_header_that_http_forbids_stops_startup(variable: str) -> None:
    with pytest.raises(vd.ConfigError, match=re.escape(variable)):
        make_config({"OPENAI_API_KEY": "sk-1", variable: "a\r\nInjected: yes" if variable.endswith("ORG") else "a"})


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_log_lines_cannot_be_forged_and_hide_secrets(upstream: FakeUpstream, tmp_path: Path,
                                                           log_format: str) -> None:
    secret = "sk-log-secret-1234567890"
    forged = f"{secret}\r\n12:00:00 INFO FORGED line\x1b[2J"
    upstream.add(Reply({"error": {"message": forged}}, status=503), Reply({"error": {"message": forged}}, status=503))
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": secret, "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "MAX_RETRIES": "1", "LOG_FORMAT": log_format}, tmp_path)
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as session, session.post(f"{proc.url}/v1/messages", json=BASIC) as response:
            assert response.status == 503 and secret not in await response.text()
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert "FORGED" in log and secret not in log and "\x1b" not in log
    lines = [line for line in log.splitlines() if "FORGED" in line]
    assert all(not line.startswith("12:00:00") for line in lines)
    if log_format == "json":
        assert all(json.loads(line) for line in lines)


async def test_slow_clients_are_cut_off(tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-slow-0000001", "CLIENT_TIMEOUT": "1"}, tmp_path)
    try:
        await proc.wait_ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")         # headers never finished
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""                                # the gateway hung up
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b'"}}')                           # the whole JSON error
        writer.close()
        assert b" 408 " in answer.split(b"\r\n")[0] and b"CLIENT_TIMEOUT" in answer
        assert (await proc.wait_ready())["status"] == "ok"
    finally:
        assert proc.stop() == 0


# ---------------------------------------------------------------------------
# §13 Operator endpoints
# ---------------------------------------------------------------------------

async def test_metrics_endpoints_count_requests(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    await client.post("/v1/messages", json=BASIC)
    await post_stream(client, BASIC)
    upstream.add(Reply({"error": {"message": "slow"}}, status=429))
    await client.post("/v1/messages", json=BASIC)
    totals = await (await client.get("/metrics/running-totals?provider=openai")).json()
    assert totals["totals"]["requests"] == 3 and totals["totals"]["errors_by_type"] == {"rate_limit_error": 1}
    model = totals["providers"]["openai"]["models"]["gpt-5.1"]
    assert model["requests"] == 3 and model["output_tokens"] == 5 + 7 and model["ttft_ms"]["p50"] is not None
    assert totals["recent"][0]["status"] == 429 and totals["recent"][1]["streamed"] is True
    text = await (await client.get("/metrics")).text()
    assert 'vandamme_requests_total{provider="openai",model="gpt-5.1",status="200"} 2' in text


async def test_json_access_log(proxy: Any, caplog: Any) -> None:
    client = await proxy({"LOG_FORMAT": "json"})
    with caplog.at_level("INFO", logger="vandamme"):
        await client.post("/v1/messages", json=BASIC, headers={"x-request-id": "rid-7"})
    line = next(r.getMessage() for r in caplog.records if "rid-7" in r.getMessage())
    record = json.loads(line)
    assert record["request_id"] == "rid-7" and record["model"] == BASIC["model"] and record["provider"] == "openai"
    assert record["status"] == 200 and record["key"] == vd._key_fingerprint("sk-test-0000000000001")
    assert "sk-test" not in line


async def test_dashboard_served_self_contained(proxy: Any) -> None:
    client = await proxy()
    response = await client.get("/")
    html = await response.text()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
    assert "<svg" in html or "createElementNS" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000", "--virtual-time-budget=5000")


async def run_chromium(profile: Path, *args: str) -> str:
    """Headless Chromium (skips the test when absent); returns its stdout."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    proc = await asyncio.create_subprocess_exec(chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    return (await asyncio.wait_for(proc.communicate(), 60))[0].decode()


async def test_dashboard_in_real_chromium(proxy: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    client = await proxy()
    for _ in range(3):
        await client.post("/v1/messages", json=BASIC)
    await post_stream(client, BASIC)
    url = str(client.make_url("/"))
    shot = tmp_path / "dashboard.png"
    await run_chromium(tmp_path / "p1", f"--screenshot={shot}", url)
    dom = await run_chromium(tmp_path / "p2", "--dump-dom", url)
    assert shot.stat().st_size > 10_000
    assert 'data-loaded="1"' in dom
    assert not re.search(r'class="(0|false|null|undefined)?"', dom)        # no bogus class from a falsy value
    totals = await (await client.get("/metrics/running-totals")).json()
    for field in ("requests", "input_tokens", "output_tokens", "errors"):
        match = re.search(rf'id="total-{field}"[^>]*data-value="(\d+)"|data-value="(\d+)"[^>]*id="total-{field}"', dom)
        assert match, field
        assert int(match.group(1) or match.group(2)) == totals["totals"][field], field
    row = re.search(r'<tr[^>]*data-provider="openai"[^>]*>(.*?)</tr>', dom, re.S)
    assert row and re.search(rf'data-field="requests"[^>]*data-value="{totals["providers"]["openai"]["requests"]}"',
                             row.group(1))
    routes = (await (await client.get("/v1/aliases")).json())["routes"]
    shown = re.findall(r'<tr data-route="([^"]+)"><td class="mono">[^<]*</td><td class="mono">([^<]*)</td>', dom)
    assert shown == [(r["name"], ", then ".join(f"{t['provider']}:{t['model']}" for t in r["targets"]))
                     for r in routes]
    await client.post("/v1/v1/messages", json=BASIC)                       # a rejected request shows too
    upstream.add(Reply({"error": {"message": "quota exceeded for this org <i>x</i>"}}, status=403))
    await client.post("/v1/messages", json=BASIC)
    dom = await run_chromium(tmp_path / "p3", "--dump-dom", url)
    assert "/v1/v1/messages" in dom and "quota exceeded for this org" in dom
    assert re.search(r'data-field="error_message">[^<]*&lt;i&gt;x&lt;/i&gt;', dom)    # shown as text, never markup


async def test_dashboard_says_which_variable_to_set(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(vd.create_app(make_config({}, tmp_path)))
    dom = await run_chromium(tmp_path / "p", "--dump-dom", str(client.make_url("/")))
    hint = re.search(r'<div class="card bad" id="hint">([^<]*)</div>', dom)
    assert hint and "OPENAI_API_KEY" in hint.group(1)


@contextlib.asynccontextmanager
async def chromium_page(profile: Path, url: str) -> Any:
    """Headless Chromium showing url in real time; yields evaluate(js) -> value, over the DevTools protocol."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    flags = [flag for flag in CHROMIUM_FLAGS if not flag.startswith("--virtual-time")]
    proc = await asyncio.create_subprocess_exec(chromium, *flags, f"--user-data-dir={profile}",
                                                "--remote-debugging-port=0", url,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            page = None
            for _ in range(300):
                port_file = profile / "DevToolsActivePort"
                lines = port_file.read_text().split() if port_file.exists() else []
                if len(lines) == 2:
                    async with session.get(f"http://127.0.0.1:{lines[0]}/json/list") as response:
                        page = next((t for t in await response.json() if t["url"] == url), None)
                if page:
                    break
                await asyncio.sleep(0.1)
            assert page, "chromium did not open the page"
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = itertools.count(1)

                async def evaluate(js: str) -> Any:
                    n = next(ids)
                    await ws.send_json({"id": n, "method": "Runtime.evaluate",
                                        "params": {"expression": js, "returnByValue": True}})
                    while (message := await ws.receive_json(timeout=30)).get("id") != n:
                        pass
                    assert "exceptionDetails" not in message["result"], message
                    return message["result"]["result"].get("value")
                await until(lambda: evaluate(f"location.href === {url!r} && document.readyState === 'complete'"), 20)
                yield evaluate
    finally:
        proc.kill()
        await proc.wait()


DIALOG_OPEN = "!document.getElementById('auth').hidden"
KEY_REJECTED = DIALOG_OPEN + " && document.getElementById('autherr').textContent.includes('rejected')"
DATA_SHOWN = "document.body.dataset.loaded === '1' && document.getElementById('auth').hidden"
SUBMIT_KEY = ("document.getElementById('authkey').value = {!r}; "
              "document.getElementById('authform').requestSubmit(); true")


async def test_dashboard_key_flow_one_poll_at_a_time(aiohttp_client: Any, tmp_path: Path) -> None:
    """Wrong key: the dialog says so; right key: the data. A key submitted while a poll is in flight waits for
    that poll, whose 401 (about the old key) does not re-open the dialog; and polling survives a failing render."""
    health_calls: list[str] = []
    hold = asyncio.Event()
    held = asyncio.Event()
    release = asyncio.Event()

    @web.middleware
    async def hold_one_health(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/health":
            health_calls.append(request.headers.get("x-api-key", ""))
            if hold.is_set() and not held.is_set():
                held.set()
                await release.wait()
        return await handler(request)

    app = vd.create_app(make_config({"OPENAI_API_KEY": "sk-test-0000000000001", "PROXY_API_KEY": "dash-secret-123"},
                                    tmp_path))
    app.middlewares.append(hold_one_health)
    client = await aiohttp_client(app)
    async with chromium_page(tmp_path / "profile", str(client.make_url("/"))) as evaluate:
        await until(lambda: evaluate(DIALOG_OPEN), 20)
        assert await evaluate("document.getElementById('autherr').textContent") == ""
        await evaluate(SUBMIT_KEY.format("wrong-key"))
        await until(lambda: evaluate(KEY_REJECTED), 20)
        hold.set()
        await asyncio.wait_for(held.wait(), 20)                     # the next poll, with the wrong key, is in flight
        calls = len(health_calls)
        await evaluate("window.reopened = false; new MutationObserver(() => { window.reopened ||= " + DIALOG_OPEN +
                       " }).observe(document.getElementById('auth'), {attributes: true}); true")
        await evaluate(SUBMIT_KEY.format("dash-secret-123"))
        await asyncio.sleep(0.5)
        assert len(health_calls) == calls                           # the new key waits for the poll in flight
        release.set()
        await until(lambda: evaluate(DATA_SHOWN), 20)
        assert health_calls[calls] == "dash-secret-123" and not await evaluate("window.reopened")
        assert (await evaluate("document.getElementById('conn').textContent")).startswith("live")
        await evaluate("document.getElementById('conn').replaceChildren = () => { throw new Error('boom') }; true")
        calls = len(health_calls)
        await until(lambda: len(health_calls) >= calls + 2, 20)    # a failed render does not stop the polling


# ---------------------------------------------------------------------------
# §15 Application and server: real processes, a lone copy, shutdown, reload, workers
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class ProxyProcess:
    """`python vandamme.py --port N` as a real process; always stopped by the caller."""

    def __init__(self, script: Path, env: dict[str, str], cwd: Path, args: tuple[str, ...] = (),
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"proxy-{self.port}.log"
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "LOG_LEVEL": "INFO", **env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(script), "--host", "127.0.0.1", "--port", str(self.port),
                                          *args], cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log()
                try:
                    async with session.get(f"{self.url}/health") as response:
                        return await response.json()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        raise AssertionError(f"proxy not ready: {self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


async def test_lone_copy_runs_in_an_empty_folder(tmp_path: Path) -> None:
    alone = tmp_path / "empty"
    alone.mkdir()
    shutil.copy(HERE / "vandamme.py", alone / "vandamme.py")
    help_run = await asyncio.to_thread(subprocess.run, [sys.executable, "vandamme.py", "--help"], cwd=alone,
                                       capture_output=True, text=True, timeout=30,
                                       env={"PATH": os.environ.get("PATH", ""), "HOME": str(alone)})
    assert help_run.returncode == 0 and "PROXY_API_KEY" in help_run.stdout
    proc = ProxyProcess(alone / "vandamme.py", {"OPENAI_API_KEY": "sk-lone"}, alone)
    try:
        health = await proc.wait_ready()
        assert health["status"] == "ok" and health["providers"][0]["name"] == "openai"
        assert health["providers"][0]["base_url"] == "https://api.openai.com/v1"
    finally:
        assert proc.stop() == 0
    assert sorted(p.name for p in alone.iterdir() if not p.name.endswith(".log")) == ["vandamme.py"]


@needs_anthropic_sdk
async def test_real_process_with_anthropic_sdk(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-proc-000000001",
                                               "OPENAI_BASE_URL": f"{upstream.url}/v1"}, tmp_path)
    try:
        await proc.wait_ready()

        def sdk_round_trip() -> tuple[Any, Any]:
            client = anthropic.Anthropic(base_url=proc.url, api_key="anything", max_retries=0)
            try:
                created = client.messages.create(**BASIC)
                with client.messages.stream(**BASIC) as stream:
                    streamed = stream.get_final_message()
                return created, streamed
            finally:
                client.close()

        created, streamed = await asyncio.to_thread(sdk_round_trip)
        assert created.content[0].text == "Hello there" and streamed.content[0].text == "Hello there"
        assert streamed.usage.output_tokens == 7
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert "export ANTHROPIC_BASE_URL=http://localhost:" in log and "sk-proc-000000001" not in log
    assert "claude-sonnet-5-5 -> openai:gpt-5.1 200 stream" in log


async def test_graceful_shutdown_finishes_in_flight_stream(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.add(Reply(stream=[sse(delta(content=f"{i} "), done=False) for i in range(6)] + [sse(finish())],
                       chunk_delay=0.3))
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "SHUTDOWN_GRACE": "10"}, tmp_path)
    try:
        await proc.wait_ready()
        async with (aiohttp.ClientSession() as session,
                    session.post(f"{proc.url}/v1/messages", json={**BASIC, "stream": True}) as response):
            first = await response.content.readline()
            proc.proc.send_signal(signal.SIGTERM)
            await until(lambda: not accepts_connections(proc.port))
            with pytest.raises(aiohttp.ClientError):       # no new connections while draining
                async with session.post(f"{proc.url}/v1/messages", json=BASIC) as late:
                    await late.read()
            rest = await response.read()
        frames = validate_stream((first + rest).decode())
        assert final_message(frames)["content"][0]["text"] == "0 1 2 3 4 5 "
        code = await asyncio.to_thread(proc.proc.wait, 15)       # it exits by itself once drained
    finally:
        proc.stop()
    assert code == 0


@pytest.mark.parametrize("relayed", [False, True], ids=["translated", "anthropic-relay"])
async def test_shutdown_grace_expiry_ends_streams_with_error(upstream: FakeUpstream, tmp_path: Path,
                                                             relayed: bool) -> None:
    env = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1", "SHUTDOWN_GRACE": "0.5"}
    if relayed:
        env.update(ANTHROPIC_API_KEY="sk-ant-000000000001", ANTHROPIC_BASE_URL=upstream.url,
                   VDM_DEFAULT_PROVIDER="anthropic")
    upstream.add(Reply(stream=[MESSAGE_START if relayed else sse(delta(content="x"), done=False)], hang=30))
    proc = ProxyProcess(HERE / "vandamme.py", env, tmp_path)
    try:
        await proc.wait_ready()
        async with (aiohttp.ClientSession() as session,
                    session.post(f"{proc.url}/v1/messages", json={**BASIC, "stream": True}) as response):
            await response.content.readline()
            proc.proc.send_signal(signal.SIGTERM)
            text = (await response.read()).decode()
        frames = parse_sse("event: message_start\n" + text.split("event: message_start\n", 1)[-1])
        assert frames[-1] == ("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": "vandamme is shutting down; retry the request"}})
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()


async def test_sighup_reloads_and_refuses_a_bad_file(upstream: FakeUpstream, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("OPENAI_ALIAS_SONNET=first-model\n")
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1"},
                        tmp_path)
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as session:
            async def upstream_model() -> str:
                async with session.post(f"{proc.url}/v1/messages", json=BASIC) as response:
                    assert response.status == 200
                return upstream.last["body"]["model"]

            assert await upstream_model() == "first-model"
            env_file.write_text("OPENAI_ALIAS_SONNET=second-model\n")
            proc.proc.send_signal(signal.SIGHUP)
            await until(lambda: "configuration reloaded" in proc.log())
            assert await upstream_model() == "second-model"
            (tmp_path / "vandamme-config.toml").write_text("[broken\n")
            proc.proc.send_signal(signal.SIGHUP)
            await until(lambda: "configuration refused" in proc.log())
            assert await upstream_model() == "second-model"
    finally:
        proc.stop()


# `--workers N`: one gateway, supervised

def _requests_counted(text: str) -> int:
    parser = pytest.importorskip("prometheus_client.parser")
    return sum(int(s.value) for f in parser.text_string_to_metric_families(text) if f.name == "vandamme_requests"
               for s in f.samples if s.name == "vandamme_requests_total")


async def _until(condition: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            if result := await condition():
                return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _pid(worker_file_name: str) -> int:
    return int(worker_file_name.split("-")[0])          # run-dir files are named PID-RANDOM


async def _scrapes_agree(url: str, expected: int, seen: list[int]) -> None:
    """12 scrapes of each view on fresh connections (so on any worker): all count `expected`, none goes back."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(12):
            async with session.get(f"{url}/metrics") as response:
                seen.append(_requests_counted(await response.text()))
            async with session.get(f"{url}/metrics/running-totals") as response:
                totals = await response.json()
                seen.append(totals["totals"]["requests"])
                assert totals["providers"]["openai"]["models"]["gpt-5.1"]["requests"] == expected
            assert seen[-2:] == [expected, expected], seen
    assert seen == sorted(seen)


async def test_workers_act_as_one_gateway_and_are_supervised(upstream: FakeUpstream, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    run_root.mkdir()
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "VDM_RUN_DIR": str(run_root), "HOME": "/proc", "SHUTDOWN_GRACE": "10"},
                        tmp_path, ("--workers", "2"))
    try:
        await proc.wait_ready()
        (run_dir,) = run_root.iterdir()
        assert run_dir.stat().st_mode & 0o777 == 0o700
        workers = lambda: {p.stem for p in run_dir.glob("*.sock")}  # noqa: E731
        first = await _until(lambda: asyncio.sleep(0, len(workers()) == 2 and workers()), "two workers")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(20):
                async with session.post(f"{proc.url}/v1/messages", json=BASIC) as response:
                    assert response.status == 200
            seen: list[int] = []
            await _scrapes_agree(proc.url, 20, seen)
            served = [json.loads((run_dir / f"{name}.json").read_text())["metrics"]["totals"][0][0] for name in first]
            assert sorted(served) != [0, 20] and sum(served) == 20     # both worked: the sum is a real merge
            victim = min(first)
            os.kill(_pid(victim), signal.SIGKILL)
            await _until(lambda: asyncio.sleep(0, len(workers() - {victim}) == 2), "a replacement worker")
            for _ in range(10):
                async with session.post(f"{proc.url}/v1/messages", json=BASIC) as response:
                    assert response.status == 200
            await _scrapes_agree(proc.url, 30, seen)
            async with session.get(f"{proc.url}/health") as response:
                assert (await response.json())["workers"] == 2
            upstream.add(Reply(stream=[sse(delta(content="x"), done=False)] * 5 + [sse(finish())], chunk_delay=0.3))
            async with session.post(f"{proc.url}/v1/messages", json={**BASIC, "stream": True}) as response:
                await response.content.readline()
                for _ in range(4):          # whichever worker answers, it counts the stream another one serves
                    async with session.get(f"{proc.url}/metrics/running-totals") as totals:
                        assert (await totals.json())["totals"]["in_flight"] == 1
                await response.read()
            os.kill(_pid(max(workers() - first)), signal.SIGKILL)             # dies young: the backoff doubles
            await _until(lambda: asyncio.sleep(0, "restarting it in 1.0s" in proc.log()), "a second restart")
            upstream.add(Reply(stream=[sse(delta(content=f"{i} "), done=False) for i in range(4)] + [sse(finish())],
                               chunk_delay=0.3))
            async with session.post(f"{proc.url}/v1/messages", json={**BASIC, "stream": True}) as response:
                first_line = await response.content.readline()
                proc.proc.send_signal(signal.SIGTERM)
                frames = validate_stream((first_line + await response.read()).decode())
        assert final_message(frames)["content"][0]["text"] == "0 1 2 3 "
        assert proc.proc.wait(15) == 0
    finally:
        proc.stop()
    log = proc.log()
    assert re.search(rf"worker \d \(pid {_pid(victim)}\) was killed by signal 9; restarting it in 0\.5s", log), log
    assert "Traceback" not in log and list(run_root.iterdir()) == [] and log.count("listening on") == 1


async def test_orphaned_workers_leave_and_free_the_port(upstream: FakeUpstream, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "TMPDIR": str(temp)}, tmp_path,
                        ("--workers", "2"))
    try:
        await proc.wait_ready()
        (run_dir,) = temp.glob("vandamme-*")
        pids = await _until(lambda: asyncio.sleep(0, len(list(run_dir.glob("*.sock"))) == 2
                                                  and [_pid(p.stem) for p in run_dir.glob("*.sock")]), "two workers")
        proc.proc.kill()
        proc.proc.wait(5)
        await _until(lambda: asyncio.sleep(0, not any(Path(f"/proc/{pid}").exists() for pid in pids)), "workers gone")
        with socket.create_server(("127.0.0.1", proc.port)):
            pass                                              # the port is free again
        assert not run_dir.exists()
    finally:
        proc.stop()
        for pid in pids if "pids" in locals() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_on_a_busy_port_say_so_in_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, str(HERE / "vandamme.py"), "--host", "127.0.0.1", "--port", str(port),
                              "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "OPENAI_API_KEY": "k"})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == f"vandamme: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# ---------------------------------------------------------------------------
# §16 Command line
# ---------------------------------------------------------------------------

def run_main(args: list[str], env: dict[str, str], cwd: Path, capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    code = vd.main(args, environ={"HOME": str(cwd), **env})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_version(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    assert run_main(["version"], {}, tmp_path, capsys, monkeypatch)[:2] == (0, f"vandamme {vd.__version__}\n")
    with pytest.raises(SystemExit) as info:
        vd.main(["--version"], environ={})
    assert info.value.code == 0 and vd.__version__ in capsys.readouterr().out


def test_cli_config_show_masks_secrets(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-very-secret-key-1234", "PROXY_API_KEY": "proxy-very-secret-5678",
           "OPENAI_ALIAS_FAST": "gpt-fast"}
    code, out, _err = run_main(["config", "show"], env, tmp_path, capsys, monkeypatch)
    assert code == 0
    assert "sk-very-secret-key-1234" not in out and "proxy-very-secret-5678" not in out
    assert "sk-…1234" in out and "openai:fast" in out and "gpt-fast" in out
    assert re.search(r"PROXY_API_KEY\s+pro…5678\s+env", out)


def test_cli_config_validate(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    assert run_main(["config", "validate"], {"OPENAI_API_KEY": "k"}, tmp_path, capsys, monkeypatch)[0] == 0
    code, _out, err = run_main(["config", "validate"], {"PORT": "x"}, tmp_path, capsys, monkeypatch)
    assert code == 1 and "PORT" in err and "Traceback" not in err


def test_cli_resolve_explains_the_rule(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "k", "OPENAI_ALIAS_OPUS": "gpt-big,groq:x"}
    code, out, _ = run_main(["resolve", "claude-opus-4-1"], env, tmp_path, capsys, monkeypatch)
    assert code == 0 and "openai:gpt-big, then openai:groq:x" in out and "alias openai:opus" in out


def test_cli_bad_port_is_one_clear_line(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(HERE / "vandamme.py"), "--port", "8082"], cwd=tmp_path, timeout=30,
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                                              "REQUEST_TIMEOUT": "later"})
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "REQUEST_TIMEOUT" in run.stderr


def test_cli_config_init_with_piped_answers(tmp_path: Path) -> None:
    answers = "openai\nsk-piped-1 sk-piped-2\nollama\n\n\nopenai\nsonnet=gpt-5.1\n\ntoml\n"
    run = subprocess.run([sys.executable, str(HERE / "vandamme.py"), "config", "init"], input=answers, text=True,
                         cwd=tmp_path, capture_output=True, timeout=30, env={"PATH": os.environ["PATH"],
                                                                             "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    written = tomllib.loads((tmp_path / "vandamme-config.toml").read_text())
    assert written["defaults"]["default-provider"] == "openai"
    assert written["openai"]["api-key"] == "sk-piped-1 sk-piped-2"
    config = make_config({}, tmp_path, cwd=tmp_path)
    assert config.provider("openai").keys == ("sk-piped-1", "sk-piped-2")
    assert vd.resolve_model(config, "claude-sonnet-5").targets[0] == vd.Target("openai", "gpt-5.1")


def test_cli_config_init_with_flags_writes_env(capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    code, out, _ = run_main(["config", "init", "--yes", "--provider", "groq", "--api-key", "gsk-1",
                             "--alias", "opus=openai/gpt-oss-120b"], {}, tmp_path, capsys, monkeypatch)
    assert code == 0 and "wrote .env" in out
    env = vd.parse_dotenv((tmp_path / ".env").read_text())
    assert env == {"VDM_DEFAULT_PROVIDER": "groq", "GROQ_API_KEY": "gsk-1", "GROQ_ALIAS_OPUS": "openai/gpt-oss-120b"}
    assert run_main(["config", "init", "--yes", "--provider", "x"], {}, tmp_path, capsys, monkeypatch)[0] == 1


async def test_cli_health_check_and_models(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1"},
                        tmp_path)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OPENAI_API_KEY": "k",
           "OPENAI_BASE_URL": f"{upstream.url}/v1"}

    async def cli(*args: str) -> tuple[int, str]:
        child = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "vandamme.py"), *args, cwd=tmp_path,
                                                     env=env, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(child.communicate(), 30))[0].decode()
        return child.returncode or 0, out

    try:
        await proc.wait_ready()
        code, out = await cli("health", "--url", proc.url)
        assert code == 0 and out.startswith("healthy") and "openai" in out
        assert "\033[" not in out                                     # no colour when not a terminal
    finally:
        proc.stop()
    assert (await cli("health", "--url", proc.url))[0] == 1
    code, out = await cli("check", "--live")
    assert code == 0 and re.search(r"openai\s+openai\s+2 models\s+ok", out), out
    code, out = await cli("models", "--provider", "openai")
    assert code == 0 and "model-a" in out and "model-b" in out


async def test_cli_health_names_a_provider_whose_keys_all_cool_down(proxy: Any, upstream: FakeUpstream,
                                                                     capsys: Any) -> None:
    client = await proxy()
    upstream.add(Reply({"error": {"message": "slow"}}, status=429, headers={"retry-after": "30"}))
    await client.post("/v1/messages", json=BASIC)             # the only key is cooling down
    url = str(client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(vd.main, ["health", "--url", url], {"HOME": "/nonexistent-vandamme-home"})
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("all keys cooling down: openai:"), out


async def test_check_live_probes_the_api_each_model_uses(upstream: FakeUpstream, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OPENAI_API_KEY": "k",
           "OPENAI_BASE_URL": f"{upstream.url}/v1", "OPENAI_API_FORMAT": "responses"}
    run = await asyncio.to_thread(subprocess.run, [sys.executable, str(HERE / "vandamme.py"), "check", "--live"],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    posted = [r for r in upstream.requests if r["method"] == "POST"]
    assert run.returncode == 0 and [r["path"] for r in posted] == ["/v1/responses"], run.stdout + run.stderr
    assert posted[0]["body"]["max_output_tokens"] >= 16 and "messages" not in posted[0]["body"]


@pytest.mark.parametrize("before", [[], ["--config", "mine.toml"], ["--port", "BUSY"]], ids=["plain", "config", "port"])
def test_cli_claude_runs_the_cli_through_a_fresh_proxy(tmp_path: Path, before: list[str]) -> None:
    """Options before `claude` (`vandamme --config X claude ...`) still run claude, never a server on PORT."""
    fake = tmp_path / "bin" / "claude"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    "curl -s \"$ANTHROPIC_BASE_URL/health\" > \"$HOME/health.json\" || "
                    f"{sys.executable} -c \"import urllib.request,os;open(os.environ['HOME']+'/health.json','wb')"
                    ".write(urllib.request.urlopen(os.environ['ANTHROPIC_BASE_URL']+'/health').read())\"\n"
                    "echo \"args: $* via $ANTHROPIC_BASE_URL\"\nexit 7\n")
    fake.chmod(0o755)
    (tmp_path / "mine.toml").write_text('[mine]\nbase-url = "http://127.0.0.1:9/v1"\n')
    with socket.socket() as busy:           # PORT is taken: a server started on it instead of claude fails at once
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        run = subprocess.run([sys.executable, str(HERE / "vandamme.py"),
                              *(port if arg == "BUSY" else arg for arg in before), "claude", "-p", "hello"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={"PATH": f"{fake.parent}:{os.environ['PATH']}", "HOME": str(tmp_path), "PORT": port,
                                  **({} if before[:1] == ["--config"] else {"OPENAI_API_KEY": "k"})})
    assert run.returncode == 7 and "args: -p hello via http://127.0.0.1:" in run.stdout, run.stdout + run.stderr
    assert f":{port}\n" not in run.stdout
    assert json.loads((tmp_path / "health.json").read_text())["status"] == "ok"     # --config: its provider only


async def test_dashboard_asks_for_the_key_when_proxy_key_is_set(proxy: Any, tmp_path: Path) -> None:
    client = await proxy({"PROXY_API_KEY": "dash-secret-123"})
    assert (await client.get("/")).status == 200                       # the page itself is public
    assert (await client.get("/metrics/running-totals")).status == 401
    dom = await run_chromium(tmp_path / "profile", "--dump-dom", str(client.make_url("/")))
    auth = re.search(r'<div id="auth"[^>]*>', dom)
    assert auth and "hidden" not in auth.group(0) and 'type="password"' in dom
    assert 'data-loaded="1"' not in dom


# ---------------------------------------------------------------------------
# §16 Command line: first run, every mistake gets a clear answer within seconds, on a real process
# ---------------------------------------------------------------------------

def vandamme_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = "",
                 stdout: Any = subprocess.PIPE, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python vandamme.py ARGS` with only the given environment and a closed stdin; bounded."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), **(env or {})}
    return subprocess.run([sys.executable, str(HERE / "vandamme.py"), *args], cwd=cwd, env=full_env, input=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


def start_logged(argv: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A process writing to log_path, in its own process group (it and whatever it starts)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def post_message(url: str, model: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """One non-streamed /v1/messages call: (status, headers, JSON body)."""
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session, \
            session.post(f"{url}/v1/messages", json=body, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


UPSTREAM_KEY_REJECTIONS = [
    pytest.param("openai", 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                 id="openai-format-401"),
    pytest.param("openai", 403, {"error": {"message": "Project does not have access", "type": "permission_error"}},
                 id="openai-format-403"),
    # Anthropic's own answer names x-api-key, which makes Claude Code print its own "Fix external API key" text.
    pytest.param("zai", 401, {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid x-api-key"}},
                 id="anthropic-format-401-says-x-api-key"),
]


@pytest.mark.parametrize(("provider", "status", "reply"), UPSTREAM_KEY_REJECTIONS)
async def test_mistake_1_wrong_provider_key_stops_claude_code_at_once(
        claude_bin: str, upstream: FakeUpstream, tmp_path: Path, provider: str, status: int, reply: dict) -> None:
    var = f"{provider.upper()}_API_KEY"
    base_url = upstream.url + ("/v1" if provider == "openai" else "")
    proc = ProxyProcess(HERE / "vandamme.py", {var: "sk-wrong-key-00000001", f"{provider.upper()}_BASE_URL": base_url,
                                               "VDM_DEFAULT_PROVIDER": provider}, tmp_path)
    upstream.add(Reply(reply, status=status))
    (tmp_path / "work").mkdir()
    try:
        await proc.wait_ready()
        started = time.monotonic()
        # Claude Code's default retries (10, about 3 minutes) are on: only x-should-retry: false stops them.
        code, result, output = await run_claude(claude_bin, proc.url, "say hi", tmp_path / "work",
                                                env_changes={"CLAUDE_CODE_MAX_RETRIES": None})
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
    shown = result.get("result", "")
    assert code == 1 and elapsed < 30, output
    assert var in shown and f"{status}" in shown and "Fix external API key" not in shown, output
    assert shown.startswith("Failed to authenticate"), output
    assert len([r for r in upstream.requests if r["method"] == "POST"]) == 1
    assert re.search(rf" {status} .*reason=\".*{var}", proc.log()), proc.log()


async def test_mistake_2_wrong_proxy_key_stops_claude_code_at_once(claude_bin: str, upstream: FakeUpstream,
                                                                  tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-cc", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "PROXY_API_KEY": "team-secret-1234"}, tmp_path)
    (tmp_path / "work").mkdir()
    try:
        await proc.wait_ready()
        started = time.monotonic()
        code, result, output = await run_claude(claude_bin, proc.url, "say hi", tmp_path / "work", env_changes={
            "CLAUDE_CODE_MAX_RETRIES": None, "ANTHROPIC_API_KEY": "not-the-proxy-key"})
        elapsed = time.monotonic() - started
        missing = await post_message(proc.url, "claude-sonnet-4-5")        # other clients: no key at all
    finally:
        proc.stop()
    shown = result.get("result", "")
    assert code == 1 and elapsed < 30, output
    assert "PROXY_API_KEY" in shown and "ANTHROPIC_API_KEY" in shown and "Fix external" not in shown, output
    status, headers, body = missing
    assert (status, headers.get("x-should-retry")) == (401, "false")
    assert "ANTHROPIC_AUTH_TOKEN" in body["error"]["message"] and "PROXY_API_KEY" in body["error"]["message"]
    assert upstream.requests == []
    assert len(re.findall(r" 401 .*reason=\"vandamme rejected the client's key", proc.log())) == 2, proc.log()


async def test_mistake_3_unconfigured_provider_prefix_is_a_400_sent_nowhere(upstream: FakeUpstream,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "vandamme-config.toml").write_text('[mygateway]\napi-format = "openai"\n')   # mentioned, no URL
    env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": f"{upstream.url}/v1"}
    proc = ProxyProcess(HERE / "vandamme.py", env, tmp_path)
    wanted = {"openrouter:anthropic/claude-sonnet-4.5": "OPENROUTER_API_KEY", "gemini:gemini-2.5-pro": "GEMINI_API_KEY",
              "mygateway:model-x": "MYGATEWAY_API_KEY"}
    try:
        await proc.wait_ready()
        answers = {model: await post_message(proc.url, model) for model in [*wanted, "qwen2.5-coder:7b"]}
    finally:
        proc.stop()
    for model, var in wanted.items():
        status, headers, body = answers[model]
        assert (status, headers.get("x-should-retry")) == (400, "false"), body
        assert var in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert answers["qwen2.5-coder:7b"][0] == 200             # not a provider name: the default provider's model
    assert [r["body"]["model"] for r in upstream.requests if r["method"] == "POST"] == ["qwen2.5-coder:7b"]
    refused = vandamme_cli("resolve", "openrouter:anthropic/claude-sonnet-4.5", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "OPENROUTER_API_KEY" in refused.stderr
    served = vandamme_cli("resolve", "qwen2.5-coder:7b", cwd=tmp_path, env=env)
    assert served.returncode == 0 and "openai:qwen2.5-coder:7b" in served.stdout


async def test_mistake_4_self_loop_is_disabled_at_startup(upstream: FakeUpstream, tmp_path: Path) -> None:
    port = free_port()
    # Claude Code's variables exported in the shell that starts the gateway.
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": f"{upstream.url}/v1",
                                               "ANTHROPIC_BASE_URL": f"http://localhost:{port}",
                                               "ANTHROPIC_API_KEY": "any-value"}, tmp_path, port=port)
    try:
        health = await proc.wait_ready()
        status, _headers, _body = await post_message(proc.url, "claude-sonnet-4-5")
    finally:
        proc.stop()
    assert [p["name"] for p in health["providers"]] == ["openai"] and status == 200
    warnings = [line for line in proc.log().splitlines() if "provider 'anthropic' disabled" in line]
    assert len(warnings) == 1 and "ANTHROPIC_BASE_URL" in warnings[0] and "loop" in warnings[0]


async def test_mistake_4_a_loop_through_two_gateways_stops_at_once(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    procs = []
    for name, port, peer in (("a", port_a, port_b), ("b", port_b, port_a)):
        (tmp_path / name).mkdir()
        procs.append(ProxyProcess(HERE / "vandamme.py", {"PEER_BASE_URL": f"http://127.0.0.1:{peer}",
                                                         "PEER_API_FORMAT": "anthropic", "PEER_API_KEY": "k"},
                                  tmp_path / name, port=port))
    try:
        for proc in procs:
            await proc.wait_ready()
        started = time.monotonic()
        status, headers, body = await post_message(procs[0].url, "claude-sonnet-4-5")
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            proc.stop()
    assert (status, headers.get("x-should-retry")) == (508, "false") and elapsed < 10
    assert "loop detected" in body["error"]["message"]
    served = [len(re.findall(r"claude-sonnet-4-5 -> peer:", proc.log())) for proc in procs]
    assert served == [2, 1], [proc.log() for proc in procs]     # client -> a -> b -> a (refused); no storm


def _busy_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


STARTUP_FAILURES = [
    pytest.param(["--port", "{busy}"], {}, "port is in use", id="port-in-use"),
    pytest.param(["--port", "70000"], {}, "--port out of range", id="port-flag-out-of-range"),
    pytest.param([], {"PORT": "70000"}, "PORT out of range", id="port-variable-out-of-range"),
    pytest.param(["--log-level", "LOUD"], {}, "--log-level must be one of", id="log-level-flag"),
    pytest.param([], {"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of", id="log-level-variable"),
    # A label over 63 characters fails inside the resolver: no DNS query leaves the machine.
    pytest.param(["--host", "a" * 64 + ".invalid"], {}, "host name does not resolve", id="host-unresolvable"),
]


@pytest.mark.parametrize(("args", "env", "expected"), STARTUP_FAILURES)
def test_mistake_5_startup_failures_are_one_line(tmp_path: Path, args: list[str], env: dict, expected: str) -> None:
    holder, busy = _busy_port()
    try:
        run = vandamme_cli(*[a.format(busy=busy) for a in args], cwd=tmp_path, env={"OPENAI_API_KEY": "k", **env})
    finally:
        holder.close()
    assert run.returncode == 1 and run.stdout == "", run.stdout
    assert run.stderr.count("\n") == 1 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_mistake_5_broken_pipe_is_quiet(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)                      # `config show | head -1` once head has gone
    try:
        run = vandamme_cli("config", "show", cwd=tmp_path, env={"OPENAI_API_KEY": "k"}, stdout=write_end)
    finally:
        os.close(write_end)
    assert run.returncode == 1 and run.stderr == ""


def test_mistake_5_old_python_gets_one_line(tmp_path: Path) -> None:
    """The file parses on Python 3.8+, and the guard runs before `import tomllib`."""
    source = (HERE / "vandamme.py").read_text()
    import ast
    ast.parse(source, feature_version=(3, 8))
    assert source.index("sys.version_info < (3, 11)") < source.index("import tomllib")
    pretend = ("import sys; sys.version_info = (3, 10, 14); sys.argv = ['vandamme.py', 'version']; "
               f"exec(compile(open({str(HERE / 'vandamme.py')!r}).read(), 'vandamme.py', 'exec'), "
               "{'__name__': '__main__'})")

    def is_old(path: str | None) -> bool:
        return bool(path) and subprocess.run([path, "-c", "import sys; assert sys.version_info < (3, 11)"],
                                             capture_output=True, timeout=30).returncode == 0
    # a real old interpreter when one works here (pyenv shims may not)
    old = next((path for path in map(shutil.which, ("python3.10", "python3.9", "python3.8")) if is_old(path)), None)
    command = [old, str(HERE / "vandamme.py"), "version"] if old else [sys.executable, "-c", pretend]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("vandamme needs Python 3.11 or newer") and run.stderr.count("\n") == 1


def test_a_python_without_aiohttp_gets_one_line(tmp_path: Path) -> None:
    """The newcomer's first mistake: a lone copy run by the system python3, before any `pip install`. Help,
    version, config and resolve still answer; serving says what to install, in one line."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        pretend = (f"import sys; sys.modules['aiohttp'] = None; sys.argv = ['vandamme.py', *{list(argv)!r}]; "
                   f"exec(compile(open({str(HERE / 'vandamme.py')!r}).read(), 'vandamme.py', 'exec'), "
                   f"{{'__name__': '__main__', '__file__': {str(tmp_path / 'vandamme.py')!r}}})")
        return subprocess.run([sys.executable, "-c", pretend], cwd=tmp_path, capture_output=True, text=True,
                              timeout=30, env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
                                               "OPENAI_API_KEY": "sk-test-000000000001"})
    serve = run("--port", "8082")
    assert serve.returncode == 1 and serve.stdout == "" and serve.stderr.count("\n") == 1
    assert serve.stderr.startswith("vandamme needs aiohttp: ") and "pip install aiohttp" in serve.stderr
    for argv, expected in ((["--help"], "usage: vandamme"), (["version"], "vandamme "),
                           (["resolve", "sonnet"], "sonnet -> openai:")):
        answer = run(*argv)
        assert answer.returncode == 0 and answer.stdout.startswith(expected) and answer.stderr == "", argv


def test_mistake_6_validate_without_provider_and_near_misses(tmp_path: Path) -> None:
    empty = vandamme_cli("config", "validate", cwd=tmp_path)
    assert empty.returncode == 1 and "OPENAI_API_KEY" in empty.stderr and "Traceback" not in empty.stderr
    near = {"OPENAI_API_KY": "sk-1", "OPENAI_BASEURL": "http://127.0.0.1:9/v1", "OPENROUTR_API_KEY": "sk-2",
            "GROQ_API_KEY": "gsk-3"}
    run = vandamme_cli("config", "validate", cwd=tmp_path, env=near)
    assert run.returncode == 0, run.stderr
    for typo, meant in (("OPENAI_API_KY", "OPENAI_API_KEY"), ("OPENAI_BASEURL", "OPENAI_BASE_URL"),
                        ("openroutr", "OPENROUTER_API_KEY")):
        assert re.search(rf"warning: .*{typo}.*did you mean {meant}\?", run.stdout), run.stdout
    assert "GROQ" not in run.stdout                          # a correct name gets no hint


async def test_mistake_6_near_misses_at_startup(tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "OPENAI_BASEURL": "http://127.0.0.1:9/v1"},
                        tmp_path)
    try:
        await proc.wait_ready()
    finally:
        proc.stop()
    assert re.search(r"warning: OPENAI_BASEURL .*did you mean OPENAI_BASE_URL\?", proc.log()), proc.log()


def test_mistake_8_public_bind_without_proxy_key_warns(tmp_path: Path) -> None:
    for host, key, warned in (("0.0.0.0", "", True), ("192.0.2.10", "", True), ("0.0.0.0", "team-secret", False),
                              ("127.0.0.1", "", False), ("localhost", "", False)):
        run = vandamme_cli("config", "validate", cwd=tmp_path, env={"OPENAI_API_KEY": "k", "HOST": host,
                                                                   "PROXY_API_KEY": key})
        assert run.returncode == 0, run.stderr
        found = re.search(rf"warning: HOST={re.escape(host)} .*PROXY_API_KEY is unset", run.stdout)
        assert bool(found) is warned, run.stdout


def test_mistake_6_config_init_refuses_a_keyless_config(tmp_path: Path) -> None:
    refused = vandamme_cli("config", "init", "--yes", "--provider", "openrouter", cwd=tmp_path)
    assert refused.returncode == 1 and "no API key for openrouter" in refused.stderr
    assert not (tmp_path / ".env").exists()
    piped = vandamme_cli("config", "init", cwd=tmp_path, stdin="gemini\n\n\n\n\nenv\n")     # no key typed
    assert piped.returncode == 1 and "no API key for gemini" in piped.stderr and not (tmp_path / ".env").exists()
    local = vandamme_cli("config", "init", "--yes", "--provider", "ollama", cwd=tmp_path)
    assert local.returncode == 0 and "OLLAMA" not in (tmp_path / ".env").read_text().replace("VDM_DEFAULT", "")
    assert vd.parse_dotenv((tmp_path / ".env").read_text()) == {"VDM_DEFAULT_PROVIDER": "ollama"}


def test_mistake_6_config_init_does_not_echo_keys(tmp_path: Path) -> None:
    """In a terminal (a pseudo-terminal here) the key is read without echo."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:                                           # pragma: no cover - the child
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, str(HERE / "vandamme.py"), "config", "init"],
                  {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "TERM": "dumb"})
    seen = b""
    answers = [b"openai\n", b"sk-typed-secret-4242\n", b"\n", b"\n", b"\n", b"env\n"]
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready = __import__("select").select([fd], [], [], 0.2)[0]
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
                if answers and seen.rstrip().endswith((b":", b"]:")):
                    os.write(fd, answers.pop(0))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL) if answers else None
        status = os.waitpid(pid, 0)[1]
        os.close(fd)
    text = seen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0 and "wrote .env" in text, text
    assert "sk-typed-secret-4242" not in text and "not shown" in text
    assert vd.parse_dotenv((tmp_path / ".env").read_text())["OPENAI_API_KEY"] == "sk-typed-secret-4242"


async def test_mistake_7_health_and_check_follow_port_and_exit_codes(upstream: FakeUpstream, tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{upstream.url}/v1"}
    proc = ProxyProcess(HERE / "vandamme.py", env, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = ProxyProcess(HERE / "vandamme.py", {}, empty)
    dotenv_dir = tmp_path / "dotenv"
    dotenv_dir.mkdir()
    (dotenv_dir / ".env").write_text(f"PORT={proc.port}\n")

    async def cli(*args: str, cwd: Path = tmp_path, **more: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(vandamme_cli, *args, cwd=cwd, env={**env, **more})
    try:
        await proc.wait_ready()
        await bare.wait_ready()
        runs = [await cli("health", "--port", str(proc.port)), await cli("health", PORT=str(proc.port)),
                await cli("health", cwd=dotenv_dir), await cli("health", "--url", f"127.0.0.1:{proc.port}")]
        no_providers = await cli("health", "--url", bare.url)
    finally:
        proc.stop()
        bare.stop()
    for run in runs:
        assert run.returncode == 0 and run.stdout.startswith("healthy"), run.stdout + run.stderr
    assert no_providers.returncode == 1 and "OPENAI_API_KEY" in no_providers.stdout
    assert "None" not in no_providers.stdout, no_providers.stdout
    unreachable = await cli("health", "--port", str(proc.port))
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stdout
    down = await cli("check", OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    assert down.returncode == 1 and re.search(r"openai\s+openai\s+no model list", down.stdout), down.stdout
    nothing = await cli("check", cwd=empty, OPENAI_API_KEY="", OPENAI_BASE_URL="")
    assert nothing.returncode == 1 and "OPENAI_API_KEY" in nothing.stderr
    # --port decides which base URL is the gateway itself: that provider is left out of the probe.
    claude_shell = {"ANTHROPIC_BASE_URL": f"http://localhost:{free_port()}", "ANTHROPIC_API_KEY": "x"}
    port = claude_shell["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1]
    looped = await cli("check", "--port", port, **claude_shell)
    probed = await cli("check", **claude_shell)
    assert looped.returncode == 0 and not re.search(r"^anthropic", looped.stdout, re.M), looped.stdout
    assert probed.returncode == 1 and re.search(r"^anthropic\s+anthropic\s+no model list", probed.stdout, re.M)


async def test_mistake_9_access_log_says_why(tmp_path: Path) -> None:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "k", "PROXY_API_KEY": "secret-1234",
                                               "MAX_REQUEST_BYTES": "2000"}, tmp_path)
    key = {"x-api-key": "secret-1234"}
    try:
        await proc.wait_ready()
        async with aiohttp.ClientSession() as session:
            answers = {}
            for name, method, path, headers, data in (
                    ("401", "POST", "/v1/messages", {}, b"{}"),
                    ("404", "POST", "/v1/v1/messages", key, b"{}"),
                    ("405", "GET", "/v1/messages", key, None),
                    ("413", "POST", "/v1/messages", key, b"x" * 5000),
                    ("forged", "GET", "/x%0D%0A10:00:00 INFO forged-line", key, None)):
                async with session.request(method, f"{proc.url}{path}", headers=headers, data=data) as response:
                    answers[name] = (response.status, await response.json())
    finally:
        proc.stop()
    log = proc.log()
    assert answers["404"][0] == 404 and "ANTHROPIC_BASE_URL" in answers["404"][1]["error"]["message"]
    assert "without /v1" in answers["404"][1]["error"]["message"]
    for status, pattern in (("401", r' 401 .*reason="vandamme rejected'),
                            ("404", (r' 404 .*path="POST /v1/v1/messages" reason=".*'
                                     r'ANTHROPIC_BASE_URL=http://HOST:PORT without /v1')),
                            ("405", r' 405 .*reason="method GET not allowed on /v1/messages"'),
                            ("413", r' 413 .*reason="request body too large.*MAX_REQUEST_BYTES=2000')):
        assert answers[status][0] == int(status) and re.search(pattern, log), (status, log)
    assert not re.search(r"^10:00:00 INFO forged-line", log, re.M) and r"\r\n10:00:00 INFO forged-line" in log


def test_no_cli_command_ever_prints_a_traceback(tmp_path: Path) -> None:
    """Every subcommand with broken inputs: an exit status and a clear line, never a traceback or `None`."""
    (tmp_path / "bad.toml").write_text("[openai\napi-key = 1\n")
    (tmp_path / "badenv").mkdir()
    (tmp_path / "badenv" / ".env").write_bytes(b"OPENAI_API_KEY=\xff\xfe\n")
    dead = f"http://127.0.0.1:{free_port()}"
    down = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": f"{dead}/v1"}
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--port", "abc"], {}, ""), (["--workers", "zero"], {}, ""),
        (["--middleware", "/nonexistent/hooks.py"], {}, ""),
        (["serve", "--config", str(tmp_path / "bad.toml")], {}, ""), (["--host", "a" * 64], {}, ""),
        (["nonsense-command"], {}, ""), (["version", "extra"], {}, ""),
        (["config"], {}, ""), (["config", "show", "--config", "/nonexistent.toml"], {}, ""),
        (["config", "show"], {"OPENAI_BASE_URL": "ftp://example"}, ""),
        (["config", "validate"], {"MAX_RETRIES": "-1"}, ""),
        (["config", "validate"], {"OPENAI_API_KEY": "!PASSTHRU k2"}, ""), (["config", "validate"], {}, ""),
        (["config", "init"], {}, ""), (["config", "init", "--yes"], {}, ""),
        (["config", "init", "--yes", "--provider", "openai", "--api-key", "k", "--output", "/nonexistent/dir/.env"],
         {}, ""),
        (["config", "init"], {}, "custom\n\n\n\n\n\n"),
        (["resolve"], {}, ""), (["resolve", "openrouter:x"], {}, ""),
        (["resolve", "gemini:x"], {"OPENAI_API_KEY": "k"}, ""),
        (["health", "--url", dead], {}, ""), (["health", "--url", "localhost:notaport"], {}, ""),
        (["health", "--url", "::::"], {}, ""), (["health", "--port", "99999"], {}, ""), (["health"], {"PORT": "x"}, ""),
        (["check"], {}, ""), (["check", "--live"], down, ""), (["check", "--port", "-1"], down, ""),
        (["models"], {}, ""), (["models", "--provider", "nope"], down, ""), (["models"], down, ""),
        (["claude", "-p", "hi"], {"PATH": "/nonexistent"}, ""),
        (["claude", "--config", "/nonexistent.toml", "-p", "hi"], {}, ""),
    ]

    def run(args: list[str], env: dict[str, str], stdin: str) -> subprocess.CompletedProcess:
        cwd = tmp_path / "badenv" if args == ["config", "validate"] and not env else tmp_path
        return subprocess.run([sys.executable, str(HERE / "vandamme.py"), *args], cwd=cwd, input=stdin, text=True,
                              capture_output=True, timeout=60,
                              env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env})
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: run(*case), cases))
    for (args, _env, _stdin), run in zip(cases, runs, strict=True):
        output = run.stdout + run.stderr
        assert run.returncode != 0, (args, output)
        assert "Traceback" not in output and "None" not in output, (args, output)
        assert output.strip(), args


# ---------------------------------------------------------------------------
# Real client: the official anthropic SDK against every upstream shape
# ---------------------------------------------------------------------------

SDK_SHAPES = {
    "text": (sse(delta(role="assistant", content="Hi "), delta(content="there"), finish(), usage_chunk()),
             completion("Hi there"),
             [{"type": "text", "text": "Hi there"}], "end_turn"),
    "tool-split-args": (sse(delta(tool_calls=[tc(0, "call_1", "Bash", "")]),
                            delta(tool_calls=[tc(0, args='{"command"')]), delta(tool_calls=[tc(0, args=': "ls"}')]),
                            finish("tool_calls"), usage_chunk()),
                        completion(None, tool_calls=[{"id": "call_1", "type": "function", "function": {
                            "name": "Bash", "arguments": '{"command": "ls"}'}}], finish_reason="tool_calls"),
                        [{"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}], "tool_use"),
    "parallel-tools-one-chunk": (
        sse(delta(tool_calls=[tc(0, "a", "Read", '{"file_path": "/a"}'), tc(1, "b", "Read", '{"file_path": "/b"}')]),
            finish("tool_calls")),
        completion(None, tool_calls=[
            {"id": "a", "type": "function", "function": {"name": "Read", "arguments": '{"file_path": "/a"}'}},
            {"id": "b", "type": "function", "function": {"name": "Read", "arguments": '{"file_path": "/b"}'}}],
                   finish_reason="tool_calls"),
        [{"type": "tool_use", "id": "a", "name": "Read", "input": {"file_path": "/a"}},
         {"type": "tool_use", "id": "b", "name": "Read", "input": {"file_path": "/b"}}], "tool_use"),
    "reasoning-then-text": (sse(delta(reasoning_content="Let me think."), delta(content="Answer."), finish()),
                            completion("Answer.", reasoning_content="Let me think."),
                            [{"type": "thinking", "thinking": "Let me think."}, {"type": "text", "text": "Answer."}],
                            "end_turn"),
    "no-index-stop-with-tool": (
        sse(delta(content="ok"), delta(tool_calls=[{"id": "g", "function": {"name": "Glob", "arguments": "{}"}}]),
            finish("stop")),
        completion("ok", tool_calls=[{"id": "g", "type": "function", "function": {"name": "Glob", "arguments": "{}"}}]),
        [{"type": "text", "text": "ok"}, {"type": "tool_use", "id": "g", "name": "Glob", "input": {}}], "tool_use"),
    "length": (sse(delta(content="trunc"), finish("length"), done=False), completion("trunc", finish_reason="length"),
               [{"type": "text", "text": "trunc"}], "max_tokens"),
}


def _plain(blocks: list) -> list[dict]:
    result = []
    for block in blocks:
        data = block.model_dump(exclude_none=True)
        data.pop("signature", None)
        data.pop("citations", None)
        data.pop("parsed_output", None)
        result.append(data)
    return result


@needs_anthropic_sdk
@pytest.mark.parametrize("shape", list(SDK_SHAPES))
async def test_anthropic_sdk_async_and_sync(proxy: Any, upstream: FakeUpstream, shape: str) -> None:
    stream_body, json_body, expected, stop_reason = SDK_SHAPES[shape]
    client = await proxy()
    base = str(client.make_url("")).rstrip("/")
    request = {"model": "claude-sonnet-5-5", "max_tokens": 100, "messages": [{"role": "user", "content": "go"}],
               "tools": [BASH_TOOL]}
    async_client = anthropic.AsyncAnthropic(base_url=base, api_key="k", max_retries=0)
    upstream.add(Reply(json_body))
    message = await async_client.messages.create(**request)
    assert _plain(message.content) == expected and message.stop_reason == stop_reason
    upstream.add(Reply(stream=stream_body))
    async with async_client.messages.stream(**request) as stream:
        final = await stream.get_final_message()
    assert _plain(final.content) == expected and final.stop_reason == stop_reason
    await async_client.close()

    def sync_calls() -> list:
        sync_client = anthropic.Anthropic(base_url=base, api_key="k", max_retries=0)
        try:
            created = sync_client.messages.create(**request)
            with sync_client.messages.stream(**request) as stream:
                streamed = stream.get_final_message()
            return [created, streamed]
        finally:
            sync_client.close()

    upstream.add(Reply(json_body), Reply(stream=stream_body))
    for message in await asyncio.to_thread(sync_calls):
        assert _plain(message.content) == expected and message.stop_reason == stop_reason
    # the raw stream of the same shape passes the grammar validator
    upstream.add(Reply(stream=stream_body))
    await post_stream(client, request)


@needs_anthropic_sdk
async def test_anthropic_sdk_error_classes(proxy: Any, upstream: FakeUpstream) -> None:
    client = await proxy()
    sdk = anthropic.AsyncAnthropic(base_url=str(client.make_url("")).rstrip("/"), api_key="k", max_retries=0)
    for status, cls in ((400, anthropic.BadRequestError), (401, anthropic.AuthenticationError),
                        (404, anthropic.NotFoundError), (429, anthropic.RateLimitError),
                        (529, anthropic.InternalServerError)):
        upstream.add(Reply({"error": {"message": f"status {status}"}}, status=status))
        with pytest.raises(cls) as info:
            await sdk.messages.create(**BASIC)
        assert f"status {status}" in str(info.value) and info.value.request_id
    upstream.add(Reply(stream=[sse(delta(content="x"), done=False), b"<reset>"]))
    with pytest.raises(anthropic.APIStatusError):
        async with sdk.messages.stream(**BASIC) as stream:
            await stream.get_final_message()
    await sdk.close()


# ---------------------------------------------------------------------------
# Real client: the Claude Code CLI, offline, through a real proxy process
# ---------------------------------------------------------------------------

CLAUDE_VERSION = "2.1.332"


def find_claude() -> str | None:
    candidates = [os.environ.get("CLAUDE_BIN")]
    if os.environ.get("VDM_CLAUDE_PREFIX"):
        candidates.append(str(Path(os.environ["VDM_CLAUDE_PREFIX"]) / "node_modules/.bin/claude"))
    candidates += ["/tmp/cc/node_modules/.bin/claude", shutil.which("claude")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture
def claude_bin() -> str:
    path = find_claude()
    if path is None:
        pytest.skip("Claude Code CLI not installed: "
                    f"npm install --prefix /tmp/cc @anthropic-ai/claude-code@{CLAUDE_VERSION}")
    return path


async def run_claude(claude: str, base_url: str, prompt: str, work: Path, *tools: str,
                     env_changes: dict[str, str | None] | None = None) -> tuple[int, dict, str]:
    """One offline print-mode run: explicit environment, throw-away HOME, no retries to wait for.
    `env_changes` sets variables, or removes those given as None."""
    home = work.parent / f"{work.name}-home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "dumb",
           "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "test-key",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "1"}
    for name, value in (env_changes or {}).items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    args = ["-p", prompt, "--model", "sonnet", "--output-format", "json"]
    if tools:
        args += ["--allowedTools", *tools]
    proc = await asyncio.create_subprocess_exec(claude, *args, cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    text = out.decode(errors="replace")
    result = next((json.loads(line) for line in reversed(text.splitlines()) if line.startswith("{")), {})
    return proc.returncode or 0, result, f"{text}\n{err.decode(errors='replace')}"


def streamed_tool_call(call_id: str, name: str, arguments: dict, *, text: str = "", reasoning: tuple = ()) -> Reply:
    args = json.dumps(arguments)
    pieces = [args[i:i + 7] for i in range(0, len(args), 7)]
    chunks = [delta(role="assistant", content="")]
    chunks += [delta(reasoning_content=r) for r in reasoning]
    chunks += [delta(content=text)] if text else []
    chunks.append(delta(tool_calls=[tc(0, call_id, name, pieces[0])]))
    chunks += [delta(tool_calls=[tc(0, args=p)]) for p in pieces[1:]]
    return Reply(stream=sse(*chunks, finish("tool_calls"), usage_chunk()))


def streamed_text(text: str) -> Reply:
    return Reply(stream=sse(delta(role="assistant", content=text[:5]), delta(content=text[5:]), finish(),
                            usage_chunk()))


def tool_answer(body: dict) -> tuple[list, list]:
    """The last assistant tool calls of an upstream request, and the tool messages after them."""
    messages = body["messages"]
    i = max(n for n, m in enumerate(messages) if m.get("tool_calls"))
    following = []
    for message in messages[i + 1:]:
        if message["role"] != "tool":
            break
        following.append(message)
    return messages[i]["tool_calls"], following


@pytest.fixture
async def cc_proxy(claude_bin: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    proc = ProxyProcess(HERE / "vandamme.py", {"OPENAI_API_KEY": "sk-cc", "OPENAI_BASE_URL": f"{upstream.url}/v1"},
                        tmp_path)
    try:
        await proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def test_claude_code_plain_prompt(claude_bin: str, cc_proxy: Any, upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.add(streamed_text("Hello from upstream: banana-7731."))
    (tmp_path / "work").mkdir()
    code, result, output = await run_claude(claude_bin, cc_proxy.url, "say hi", tmp_path / "work")
    assert code == 0 and result.get("is_error") is False, output + cc_proxy.log()
    assert "banana-7731" in result["result"]
    chat = [r for r in upstream.requests if r["path"].endswith("/chat/completions")]
    assert len(chat) == 1 and chat[0]["body"]["stream"] is True


async def test_claude_code_bash_round_trip(claude_bin: str, cc_proxy: Any, upstream: FakeUpstream,
                                           tmp_path: Path) -> None:
    upstream.add(streamed_tool_call("call_bash_1", "Bash", {"command": "echo hi", "description": "Print hi"},
                                    text="Running it."),
                 streamed_text("The command printed hi (done-5150)."))
    (tmp_path / "work").mkdir()
    code, result, output = await run_claude(claude_bin, cc_proxy.url, "run echo hi", tmp_path / "work", "Bash")
    assert code == 0 and "done-5150" in result.get("result", ""), output + cc_proxy.log()
    calls, answers = tool_answer(upstream.requests[-1]["body"])
    assert calls[0]["function"]["name"] == "Bash"
    assert json.loads(calls[0]["function"]["arguments"])["command"] == "echo hi"
    assert answers[0]["tool_call_id"] == calls[0]["id"] == "call_bash_1" and "hi" in answers[0]["content"]


async def test_claude_code_thinking_then_tool(claude_bin: str, cc_proxy: Any, upstream: FakeUpstream,
                                              tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "note.txt").write_text("fixture-content-42\n")
    upstream.add(streamed_tool_call("call_read_1", "Read", {"file_path": str(work / "note.txt")},
                                    reasoning=("The user wants the file; ", "I will read it.")),
                 streamed_text("The file says fixture-content-42 (ok-9921)."))
    code, result, output = await run_claude(claude_bin, cc_proxy.url, "read note.txt", work, "Read")
    assert code == 0 and "ok-9921" in result.get("result", ""), output + cc_proxy.log()
    calls, answers = tool_answer(upstream.requests[-1]["body"])
    assert calls[0]["function"]["name"] == "Read" and answers[0]["tool_call_id"] == "call_read_1"
    assert "fixture-content-42" in answers[0]["content"]


# ---------------------------------------------------------------------------
# README: the first screen on a fresh machine, and every recipe
# ---------------------------------------------------------------------------

def readme_section(title: str) -> str:
    text = (HERE / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


RECIPE_BLOCKS = re.findall(r"```bash\n(.*?)```", readme_section("Recipes"), re.S)


@pytest.mark.parametrize("block", [pytest.param(b, id=re.search(r"export (\w+?)_", b).group(1).lower() + f"-{i}")
                                   for i, b in enumerate(RECIPE_BLOCKS)])
def test_readme_recipe_routes_as_written(block: str, capsys: Any, monkeypatch: Any, tmp_path: Path) -> None:
    env = dict(re.findall(r"^export (\w+)=(\S+)", block, re.M))
    checks = re.findall(r"^python vandamme\.py resolve (\S+)\s+# -> (\S+)$", block, re.M)
    assert env and checks, block
    code, out, err = run_main(["config", "validate"], env, tmp_path, capsys, monkeypatch)
    assert code == 0 and "warning" not in out, out + err
    for model, target in checks:
        code, out, err = run_main(["resolve", model], env, tmp_path, capsys, monkeypatch)
        assert code == 0 and out.startswith(f"{model} -> {target}\n"), (model, out, err)


async def test_readme_claude_code_family_variable_reaches_the_model(claude_bin: str, cc_proxy: Any,
                                                                    upstream: FakeUpstream, tmp_path: Path) -> None:
    """The recipe's client side: ANTHROPIC_DEFAULT_SONNET_MODEL=provider:model picks what `sonnet` means."""
    upstream.add(streamed_text("Mapped model answered (map-3141)."))
    (tmp_path / "work").mkdir()
    code, result, output = await run_claude(claude_bin, cc_proxy.url, "say hi", tmp_path / "work",
                                            env_changes={"ANTHROPIC_DEFAULT_SONNET_MODEL": "openai:mapped-sonnet"})
    assert code == 0 and "map-3141" in result.get("result", ""), output + cc_proxy.log()
    assert [r["body"]["model"] for r in upstream.requests if r["method"] == "POST"] == ["mapped-sonnet"]


@pytest.mark.slow
async def test_fresh_machine_first_screen_as_written(upstream: FakeUpstream, tmp_path: Path) -> None:
    """SLOW (a new venv and `pip install aiohttp` from the package registry: about 30 s, at most 10 min).

    The README's first screen, exactly as written, in a new folder holding only vandamme.py, with only
    /usr/bin and /bin on PATH (no `python`): the gateway starts, and the client line as written (its port
    changed) gets an answer, from the real Claude Code CLI when installed.
    """
    block = re.search(r"<!-- first-screen[^>]*-->\n```bash\n(.*?)```", (HERE / "README.md").read_text(), re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert lines[-1] == "OPENAI_API_KEY=sk-... python vandamme.py" and "python3 -m venv" in lines[0]
    folder = tmp_path / "fresh"
    folder.mkdir()
    shutil.copy(HERE / "vandamme.py", folder / "vandamme.py")
    port = free_port()
    script = "\n".join(lines)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PORT": str(port), "OPENAI_BASE_URL": f"{upstream.url}/v1"}
    log_path = tmp_path / "fresh.log"
    shell = start_logged(["bash", "-ec", script], folder, env, log_path)
    try:
        deadline = time.monotonic() + 600
        async with aiohttp.ClientSession() as session:
            while True:
                offline = r"Failed to establish a new connection|Temporary failure in name resolution"
                if shell.poll() is not None and re.search(offline, log_path.read_text(errors="replace")):
                    pytest.skip("the package registry is not reachable from here")
                assert shell.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        if (await response.json())["status"] == "ok":
                            break
                await asyncio.sleep(0.5)
        client = re.search(r"```bash\n(ANTHROPIC_BASE_URL=\S+ ANTHROPIC_API_KEY=\S+ claude)\n```",
                           (HERE / "README.md").read_text())
        assert client is not None
        claude = find_claude()
        if claude is not None:
            env_line = client.group(1).replace(":8082", f":{port}").removesuffix(" claude")
            changes = dict(pair.split("=", 1) for pair in env_line.split())
            (tmp_path / "work").mkdir()
            upstream.add(streamed_text("Fresh machine works (fresh-2718)."))
            code, result, output = await run_claude(claude, changes["ANTHROPIC_BASE_URL"], "say hi", tmp_path / "work",
                                                    env_changes=changes)
            assert code == 0 and "fresh-2718" in result.get("result", ""), output
        else:
            status, _headers, body = await post_message(f"http://127.0.0.1:{port}", "claude-sonnet-4-5",
                                                        {"x-api-key": "any-value"})
            assert status == 200 and body["content"][0]["text"] == "Hello there"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)
        try:
            shell.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert "vandamme needs" not in log_path.read_text(errors="replace")


async def test_mistake_9_base_url_ending_in_v1_is_explained_in_the_log(claude_bin: str, cc_proxy: Any,
                                                                      upstream: FakeUpstream, tmp_path: Path) -> None:
    """Claude Code shows its own text for any 404; the gateway's log line says what to fix."""
    (tmp_path / "work").mkdir()
    started = time.monotonic()
    code, _result, output = await run_claude(claude_bin, f"{cc_proxy.url}/v1", "say hi", tmp_path / "work")
    assert code == 1 and time.monotonic() - started < 30, output
    assert upstream.requests == []
    assert re.search(r' 404 .*path="POST /v1/v1/messages" reason=".*ANTHROPIC_BASE_URL=http://HOST:PORT without /v1',
                     cc_proxy.log()), cc_proxy.log()


