"""A minimal OpenAI-compatible upstream for benchmarks: precomputed bytes, no delay.

`tests/support/fake_openai.py` is the faithful fake (directives, faults, a request log); this
one only answers `POST /v1/chat/completions` with the same wire shapes, built once per model
and reused, so that its own CPU cost stays far below the platform's (bench/README.md has the
measurement). Every stream carries `chunks` content events, a role event, a finish event, a
usage-only event (always: the platform always asks for it) and `data: [DONE]`, in one write,
as the faithful fake does without faults.

    python bench/fake_upstream.py [--port 0] [--chunks 20]

prints `PORT <n>` on stdout once it listens, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import time

import orjson
from aiohttp import web

PROMPT_TOKENS = 5  # "hello benchmark": 2 words + 3 per message, as the faithful fake counts
FINGERPRINT = "fp_bench0001"


def _split(text: str, parts: int) -> list[str]:
    """`parts` non-empty slices of `text` (it is padded if too short)."""
    while len(text) < parts:
        text += "."
    size, extra = divmod(len(text), parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append(text[at:at + n])
        at += n
    return out


class Answers:
    """The reply bytes for each model name, built on first use."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.pieces = _split("Echo: hello benchmark, " + "lorem ipsum " * chunks, chunks)
        self.usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": chunks,
            "total_tokens": PROMPT_TOKENS + chunks,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        self._json: dict[str, bytes] = {}
        self._sse: dict[str, bytes] = {}

    def json(self, model: str) -> bytes:
        body = self._json.get(model)
        if body is None:
            body = self._json[model] = orjson.dumps({
                "id": "chatcmpl-bench0000000000000000", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.pieces),
                                                      "refusal": None, "annotations": []},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": self.usage, "service_tier": "default", "system_fingerprint": FINGERPRINT,
            })
        return body

    def sse(self, model: str) -> bytes:
        body = self._sse.get(model)
        if body is None:
            head = {"id": "chatcmpl-bench0000000000000000", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": model, "service_tier": "default",
                    "system_fingerprint": FINGERPRINT}

            def event(choices: list, usage=None) -> bytes:
                return b"data: " + orjson.dumps({**head, "choices": choices, "usage": usage}) + b"\n\n"

            def choice(delta: dict, finish=None) -> list:
                return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

            events = [event(choice({"role": "assistant", "content": "", "refusal": None}))]
            events += [event(choice({"content": piece})) for piece in self.pieces]
            events.append(event(choice({}, "stop")))
            events.append(event([], self.usage))
            events.append(b"data: [DONE]\n\n")
            body = self._sse[model] = b"".join(events)
        return body


def build_app(chunks: int) -> web.Application:
    answers = Answers(chunks)
    headers = {"x-request-id": "req_bench", "openai-processing-ms": "1"}

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
            model = body["model"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400, content_type="application/json",
                                body=b'{"error":{"message":"bad request","type":"invalid_request_error","param":null,"code":null}}')
        if not body.get("stream"):
            return web.Response(body=answers.json(model), headers=headers, content_type="application/json")
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        await response.write(answers.sse(model))
        await response.write_eof()
        return response

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat_completions)])
    return app


async def serve(port: int, chunks: int) -> None:
    runner = web.AppRunner(build_app(chunks), access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    try:
        import uvloop  # installed with uvicorn[standard]
    except ImportError:
        asyncio.run(serve(args.port, args.chunks))
    else:
        uvloop.run(serve(args.port, args.chunks))


if __name__ == "__main__":
    main()
