"""Request headers are bounded like nginx's (8 KiB a line, 32 KiB in all, 100 headers) in every
server the README names: the run command's uvicorn, and daphne. Raw sockets, real processes."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from llm_platform.embedded import free_port
from llm_platform.up import server_command
from tests.conftest import ROOT, _server_env


class Process:
    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(command, cwd=ROOT, env=_server_env(port), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _uvicorn() -> Process:
    port = free_port()
    return Process("uvicorn", server_command("127.0.0.1", port), port)


def _daphne() -> Process:
    port = free_port()
    return Process("daphne", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                    "llm_platform.asgi:application"], port)


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def http_server(request, routes, flushed_redis):
    server = {"uvicorn": _uvicorn, "daphne": _daphne}[request.param]()
    yield server
    server.stop()


def _exchange(port: int, head: bytes, head_chunk: int = 64 * 1024) -> int | None:
    """Send a request from a thread (the server may refuse it halfway): the answer's status, or
    None when the server cut the connection before the request was sent whole (a refusal whose
    answer the client's unsent bytes turned into a reset)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    cut = threading.Event()

    def write() -> None:
        try:
            for start in range(0, len(head), head_chunk):
                sock.sendall(head[start:start + head_chunk])
        except OSError:
            cut.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    received = b""
    try:
        while b"\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    finally:
        writer.join(15)
        sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
    if match is None:
        assert cut.is_set(), f"no answer and no refusal: {received[:200]!r}"
        return None
    return int(match.group(1))


def _refused(status: int | None, server: Process) -> bool:
    """The run command's uvicorn answers 431; daphne (Twisted) answers 400 and closes, which a
    client still sending sees as a reset."""
    return status == 431 if server.name == "uvicorn" else status in (400, None)


def _head(*headers: bytes, method: bytes = b"GET", path: bytes = b"/health") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def test_a_64_mib_header_is_refused(http_server):
    huge = b"X-Big: " + b"a" * (64 * 1024 * 1024)
    assert _refused(_exchange(http_server.port, _head(huge)), http_server)


def test_ten_thousand_headers_are_refused(http_server):
    many = [b"X-H%d: v" % i for i in range(10_000)]
    assert _refused(_exchange(http_server.port, _head(*many)), http_server)


def test_a_header_over_8_kib_is_refused_by_the_run_commands_server(routes, flushed_redis):
    server = _uvicorn()
    try:
        assert _exchange(server.port, _head(b"X-Long: " + b"a" * (9 * 1024))) == 431
        assert _exchange(server.port, _head(*[b"X-H%d: v" % i for i in range(101)])) == 431
    finally:
        server.stop()


def test_ordinary_heads_and_large_bodies_pass(http_server):
    usual = [b"X-H%d: %s" % (i, b"v" * 100) for i in range(50)] + [b"X-Cookie: " + b"c" * 6000]
    assert _exchange(http_server.port, _head(*usual)) == 200
    # A 1 MiB body arriving with the head is body, not head: it reaches the application (401: no key).
    body = b'{"model": "local", "messages": [{"role": "user", "content": "' + b"a" * (1024 * 1024) + b'"}]}'
    head = _head(b"Content-Type: application/json", b"Content-Length: %d" % len(body), method=b"POST",
                 path=b"/v1/chat/completions")
    assert _exchange(http_server.port, head + body) == 401
