"""uvicorn's httptools protocol with request headers bounded as nginx bounds them.

httptools (llhttp) has no limit of its own: a 64 MiB header or 10,000 headers were read whole
and handed to the application. This protocol refuses, with 431 and OpenAI's error shape:
- a header line (name and value) over `GW_MAX_HEADER_LINE_BYTES` (8 KiB, nginx's buffer size);
- a request head (request line and headers) over `GW_MAX_HEADER_BYTES` (32 KiB, nginx's 4 x 8 KiB);
- more than `GW_MAX_HEADERS` headers (100, Apache's LimitRequestFields).
An unfinished head is cut off once it passes the limit by more than one network read, so a
connection never holds more than that in memory. After the 431 the connection reads and drops
what the client still sends for a moment (a lingering close, as nginx does) so that the client
reads the answer instead of a reset.

Serve with `uvicorn llm_platform.asgi:application --http llm_platform.server_protocol:BoundedHttpToolsProtocol`
(the run command does). h11 (uvicorn's `--http h11`) bounds a head to 16 KiB by itself; daphne
(Twisted) to 16 KiB and 500 headers.
"""

from __future__ import annotations

import os

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _limit(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


MAX_HEADER_LINE_BYTES = _limit("GW_MAX_HEADER_LINE_BYTES", 8 * 1024)
MAX_HEADER_BYTES = _limit("GW_MAX_HEADER_BYTES", 32 * 1024)
MAX_HEADERS = _limit("GW_MAX_HEADERS", 100)
READ_SLACK = 256 * 1024  # one network read (uvloop reads up to 256 KiB at a time)
LINGER_SECONDS = 2.0


class HeadersTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # bytes count toward a request head until its headers complete
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: str | None = None
        self._lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: read and drop until the connection closes
        super().data_received(data)
        if self._in_head and not self._lingering and not self.transport.is_closing():
            # The head is still unfinished: all of this read belongs to it (or to the end of the
            # previous request's body, hence the slack; the exact limit is checked when it ends).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES + READ_SLACK:
                self._refuse(f"Request headers over {MAX_HEADER_BYTES} bytes.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._refusal = f"More than {MAX_HEADERS} request headers."
            raise HeadersTooLarge(self._refusal)
        if len(name) + len(value) > MAX_HEADER_LINE_BYTES:
            self._refusal = f"A request header over {MAX_HEADER_LINE_BYTES} bytes."
            raise HeadersTooLarge(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEADER_BYTES:
            self._refusal = f"Request headers over {MAX_HEADER_BYTES} bytes."
            raise HeadersTooLarge(self._refusal)
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; ours, raised from a callback above, is a 431."""
        if self._refusal is None:
            return super().send_400_response(msg)
        self._refuse(self._refusal)

    def _refuse(self, message: str) -> None:
        body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": "request_header_fields_too_large"}})
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
