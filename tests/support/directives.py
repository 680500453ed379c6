"""Per-request directives and fault plans shared by the fake upstream servers.

A test steers a fake by writing directives into the last user message (or tool result),
e.g. ``"hello [[fault:429]] [[tool:get_weather]]"``. They are stripped from the echoed reply,
so the answer is still ``"Echo: hello"``.

- ``[[fault:KIND]]``, combinable; the same specs work in an ``X-Fake-Fault`` header,
  comma-separated:
  ``429`` / ``429:MS`` (``Retry-After`` in whole seconds, rounded up, and ``retry-after-ms``);
  any of 400 401 403 404 408 409 422 500 502 503 504 529 in the vendor's error shape;
  ``timeout`` (hang ``timeout_seconds`` first); ``slow_first_byte:MS``;
  ``drip:MS`` (pause between SSE events); ``cut:K`` (send K SSE events, or half a JSON body,
  then drop the connection); ``malformed`` (half a JSON body, or a broken SSE event);
  ``empty`` (no content); ``stream_error:K`` (an error event after K SSE events).
- ``[[tool:NAME]]``: answer with a call to NAME (repeat for parallel calls) when tools are sent.
- ``[[stop:REASON]]``: force the finish/stop reason; OpenAI and Anthropic names both work.
- ``[[cache:R]]`` / ``[[cache:R,C]]``: report R cache-read and C cache-write tokens.
- ``[[chunks:N]]``: split this reply into N pieces instead of the server's ``chunks``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

DIRECTIVE_RE = re.compile(r"\[\[(fault|tool|stop|cache|chunks):([^\]]*)\]\]")

STATUS_FAULTS = frozenset({400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504, 529})


class DirectiveError(ValueError):
    """A directive or fault spec the fakes do not understand (a typo in a test)."""


@dataclass(slots=True)
class Faults:
    """What should go wrong with one response; several faults may combine."""

    status: int | None = None
    retry_after_ms: int = 1000
    timeout: bool = False
    first_byte_ms: int = 0
    drip_ms: int = 0
    cut_after: int | None = None
    malformed: bool = False
    empty: bool = False
    stream_error_after: int | None = None

    @property
    def shapes_stream(self) -> bool:
        """True when the body cannot be written in one piece."""
        return bool(
            self.drip_ms
            or self.cut_after is not None
            or self.malformed
            or self.stream_error_after is not None
        )

    def add(self, spec: str) -> None:
        """Merge one spec such as ``429``, ``429:250``, ``drip:20`` or ``cut:3``."""
        kind, _, arg = spec.strip().partition(":")
        kind = kind.strip().lower()
        if kind.isdigit():
            self.status = int(kind)
            if self.status not in STATUS_FAULTS:
                raise DirectiveError(f"unsupported status fault {spec!r}")
            if arg:
                self.retry_after_ms = _int(arg, spec)
        elif kind == "timeout":
            self.timeout = True
        elif kind == "slow_first_byte":
            self.first_byte_ms = _int(arg, spec)
        elif kind == "drip":
            self.drip_ms = _int(arg, spec)
        elif kind == "cut":
            self.cut_after = _int(arg, spec)
        elif kind == "stream_error":
            self.stream_error_after = _int(arg or "1", spec)
        elif kind == "malformed":
            self.malformed = True
        elif kind == "empty":
            self.empty = True
        elif kind:
            raise DirectiveError(f"unknown fault kind {spec!r}")

    def merged(self, specs: Iterable[str]) -> Faults:
        """A copy of these faults with more specs applied."""
        out = replace(self)
        for spec in specs:
            out.add(spec)
        return out


NO_FAULTS = Faults()  # shared by every fault-free request; never mutated


def parse_faults(value: str | Iterable[str] | None) -> Faults:
    """Parse ``"drip:10,cut:3"`` (or a list of specs); ``None`` means no fault."""
    faults = Faults()
    if value is None:
        return faults
    specs = value.split(",") if isinstance(value, str) else value
    for spec in specs:
        faults.add(spec)
    return faults


@dataclass(slots=True)
class Directives:
    """Everything a test asked for in the last user message."""

    faults: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    stop: str | None = None
    cache_read: int = 0
    cache_write: int = 0
    chunks: int | None = None


NO_DIRECTIVES = Directives()


def parse_directives(text: str) -> Directives:
    """Collect directives from ``text``; cheap when there are none."""
    if "[[" not in text:
        return NO_DIRECTIVES
    found = Directives()
    for name, arg in DIRECTIVE_RE.findall(text):
        arg = arg.strip()
        if name == "fault":
            found.faults.append(arg)
        elif name == "tool":
            found.tools.append(arg)
        elif name == "stop":
            found.stop = arg
        elif name == "chunks":
            found.chunks = max(1, _int(arg, arg))
        else:  # cache:R or cache:R,C
            read, _, write = arg.partition(",")
            found.cache_read = _int(read, arg)
            found.cache_write = _int(write or "0", arg)
    return found


def strip_directives(text: str) -> str:
    """The user text without directives, whitespace collapsed."""
    if "[[" not in text:
        return text.strip()
    return " ".join(DIRECTIVE_RE.sub(" ", text).split())


def split_even(text: str, n: int) -> list[str]:
    """Split into ``min(n, len(text))`` non-empty slices; none for ``""``."""
    if not text:
        return []
    n = max(1, min(n, len(text)))
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop string, as the vendors do."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if stop and (pos := text.find(stop)) >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


def word_count(text: str) -> int:
    return len(text.split())


def _int(value: str, spec: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise DirectiveError(f"expected a number in {spec!r}") from None
