"""The platform's upstream credentials, and their removal from whatever a tenant, a log line or a
stored row can see.

A provider may echo the key it was sent (in an error message, an error code, a mid-stream error
event), whatever its shape (`sk-...`, `gsk_live_...`, a JWT). So every configured credential's
exact value is replaced, not only what looks like a key: OPENAI_API_KEY and ANTHROPIC_API_KEY,
every lane's `api_key_env` in the route table and every key a provider client was made with
(the value of the `Authorization` / `x-api-key` header it sends).

No Django import at module level: the logging configuration loads `RedactCredentials` before
the apps are ready.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

REDACTED = "[redacted]"
# Shorter values are not credentials (the Anthropic client's placeholder "unset", test keys like
# "x"): replacing them would garble ordinary text.
MIN_LENGTH = 8
_ALWAYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
# Keys of the `sk-` family that no configuration names (a tenant-side or another account's key).
_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+")

_lock = threading.Lock()
_names: set[str] = set(_ALWAYS)
_values: set[str] = set()
_compiled: tuple[frozenset[str], re.Pattern | None] = (frozenset(), None)


def remember_name(name: str | None) -> None:
    """An environment variable that holds a credential (a lane's `api_key_env`)."""
    if name and name not in _names:
        with _lock:
            _names.add(name)


def remember_value(value: str | None) -> None:
    """A credential the platform sends upstream."""
    if value and len(value) >= MIN_LENGTH and value not in _values:
        with _lock:
            _values.add(value)


def _route_table_names() -> set[str]:
    """The `api_key_env` of every lane in this process's route table, once it is loaded (never
    imported from here: the route table needs Django's apps)."""
    routing = sys.modules.get("gateway.routing")
    table = getattr(getattr(routing, "routes", None), "_table", None) or {}
    return {lane.api_key_env for route in table.values() for lane in route.lanes if lane.api_key_env}


def _pattern() -> re.Pattern | None:
    global _compiled
    names = _names | _route_table_names()
    values = {v for v in (os.environ.get(n) for n in names) if v and len(v) >= MIN_LENGTH} | _values
    known, pattern = _compiled
    if values == known:
        return pattern
    # Longest first, so a key that contains another is replaced whole.
    alternatives = sorted(values, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
    _compiled = (frozenset(values), pattern)
    return pattern


def redact(text: str) -> str:
    """`text` without any configured credential (nor the body of an `sk-` shaped key)."""
    if not text:
        return text
    pattern = _pattern()
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _SECRETISH.sub(r"\1…", text)


_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RedactCredentials(logging.Filter):
    """On a handler: its lines never carry a credential, in the message, its arguments, the
    exception's text or an `extra=` field."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                # Formatters print exc_text when exc_info is gone; ours prints the `exc` field.
                record.exc_info, record.exc_text = None, clean
                record.exc = clean
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True
