"""Byte relay baseline: the cheapest useful aiohttp hop, the floor for any Python proxy.

POST /v1/messages is forwarded to {upstream}/v1/messages (the fake upstream's native Anthropic endpoint);
request and response bytes pass unchanged (responses streamed as they arrive). GET /health answers locally.

Run: python bench/relay.py --port 9002 --upstream http://127.0.0.1:9001
"""
import argparse
import os
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

sys.dont_write_bytecode = True   # keep bench/ free of __pycache__
sys.path.insert(0, os.path.dirname(__file__))
from common import install_loop  # noqa: E402


def make_app(upstream):
    app = web.Application(client_max_size=64 << 20)

    async def start(app):
        app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False,
                                       timeout=ClientTimeout(total=None, sock_connect=10))

    async def stop(app):
        await app["session"].close()

    async def messages(request):
        body = await request.read()
        async with request.app["session"].post(upstream + "/v1/messages", data=body,
                                               headers={"Content-Type": "application/json"}) as up:
            ctype = up.headers.get("Content-Type", "application/json")
            if not ctype.startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
            await resp.prepare(request)
            try:
                async for data in up.content.iter_any():
                    await resp.write(data)
                await resp.write_eof()
            except ConnectionResetError:       # the client hung up: drop the upstream response too
                pass
            return resp

    async def health(request):
        return web.json_response({"status": "ok"})

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9002)
    ap.add_argument("--upstream", default="http://127.0.0.1:9001")
    a = ap.parse_args()
    print(f"relay loop: {install_loop()}", flush=True)
    web.run_app(make_app(a.upstream.rstrip("/")), host=a.host, port=a.port, access_log=None,
                print=None, backlog=4096)
