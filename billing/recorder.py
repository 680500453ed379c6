"""Buffer usage rows in a Redis stream: one XADD on the request path, no PostgreSQL round trip.

The writer (billing/writer.py) drains the stream into PostgreSQL in batches, at least once,
deduplicated by request id, so a crash anywhere loses no row and writes none twice.

A row that cannot reach Redis (an outage) goes to a spool file on local disk instead
(`GW_USAGE_SPOOL_DIR`), one JSON line per row, and `flush_pending` (every second) sends the
spool to Redis once it answers (and first makes the rows durable: one fsync a second, off the
event loop, so a power cut loses at most the last second). Each process appends to a file of
its own and holds an exclusive `flock` on it while it lives; a file whose lock can be taken
belongs to a process that died, and the next process to look sends its rows too. Rows sent
twice (a crash between the XADD and the file's removal) are dropped by the writer.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import socket
import time
from pathlib import Path

from django.conf import settings

from llm_platform.resp import get_resp, pack_command, raise_errors

from .ledger import UsageRow

log = logging.getLogger(__name__)
_BATCH = 500  # rows per write when sending a spool


def stream_name() -> str:
    return settings.GATEWAY["USAGE_STREAM"]


async def record(row: UsageRow) -> None:
    """Buffer one usage row."""
    payload = row.to_json()
    try:
        raise_errors(await get_resp().execute_many([("XADD", stream_name(), "*", "row", payload)], defer=True))
    except Exception:
        _spooled(payload, row.request_id)


def rider(row: UsageRow) -> Rider:
    """The row's XADD, packed, to ride in another write (the request's settlement, whose
    `submit` takes it as `rider`) instead of a write of its own; whoever writes it hands it the
    reply. Recorded exactly as by `record`: spooled if the write fails."""
    return Rider(row)


class Rider:
    """A usage row's XADD riding in another call's write (a `llm_platform.resp.Rider`): its
    reply, an error reply or the write's failure, once; anything but an entry id spools the row."""

    __slots__ = ("command", "payload", "request_id", "landed")

    def __init__(self, row: UsageRow) -> None:
        self.payload = row.to_json()
        self.command = pack_command(("XADD", stream_name(), "*", "row", self.payload))
        self.request_id = row.request_id
        self.landed = False  # its outcome was handed in: later ones are ignored (one spooling at most)

    def done(self) -> bool:
        return self.landed

    def set_result(self, reply) -> None:
        if isinstance(reply, Exception):  # an error reply: the row is not in the stream
            self.set_exception(reply)
        else:
            self.landed = True

    def set_exception(self, exc: BaseException) -> None:
        if not self.landed:
            self.landed = True
            _spooled(self.payload, self.request_id)


def _spooled(payload: bytes, request_id) -> None:
    _spool.append(payload)
    log.error("usage buffer unreachable; row spooled to disk", extra={"request_id": request_id})


class _Spool:
    """This process's spool file, and the adoption of dead processes' files."""

    def __init__(self) -> None:
        self._file = None  # open, locked, while this process has unsent rows
        self._sending = False
        self._unsynced = False  # rows written since the last fsync

    def folder(self) -> Path:
        """One folder per destination (Redis and stream), so rows only ever go where they were bound."""
        where = hashlib.sha1(f"{settings.REDIS_URL}|{stream_name()}".encode()).hexdigest()[:12]
        return Path(settings.GATEWAY["USAGE_SPOOL_DIR"]) / where

    def append(self, payload: bytes) -> None:
        if self._file is None:
            folder = self.folder()
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.jsonl"
            self._file = open(folder / name, "ab")  # noqa: SIM115 - open while rows wait
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self._file.write(payload + b"\n")
        self._file.flush()  # in the page cache: a killed process loses nothing; `sync` follows
        self._unsynced = True

    async def sync(self) -> None:
        """Make the rows written so far durable: the file's data, and its name in the folder.
        In a thread: an fsync may take milliseconds, the event loop must not wait on it."""
        if not self._unsynced or self._file is None:
            return
        self._unsynced = False
        fd, folder = self._file.fileno(), str(Path(self._file.name).parent)
        try:
            await asyncio.to_thread(_fsync_file_and_folder, fd, folder)
        except OSError:
            self._unsynced = True
            log.warning("could not fsync the usage spool; retrying in a second")

    def has_rows(self) -> bool:
        return self._file is not None

    def _claim(self) -> list:
        """Files to send now, each open and locked by us: ours (closed to appends from here on,
        new rows start a new file) and those of processes that died."""
        claimed = []
        if self._file is not None:
            claimed.append(self._file)
            self._file = None
        folder = self.folder()
        if not folder.is_dir():
            return claimed
        for path in sorted(folder.glob("*.jsonl")):
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed by _send
            except FileNotFoundError:
                continue  # another process just sent it
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()  # a live process's file (ours included: locks are per open file)
                continue
            if not os.path.exists(path):  # sent and removed between our open and our lock
                handle.close()
                continue
            claimed.append(handle)
        return claimed

    async def send(self) -> int:
        """Send every claimable spool file to Redis; a file is removed once all its rows are in."""
        if self._sending:
            return 0
        self._sending = True
        sent = 0
        try:
            claimed = self._claim()
            for i, handle in enumerate(claimed):
                try:
                    sent += await self._send_file(handle)
                except Exception:
                    for rest in claimed[i:]:  # Redis is still away: hand them back
                        self._give_back(rest)
                    raise
        finally:
            self._sending = False
        return sent

    async def _send_file(self, handle) -> int:
        rows = _rows_of(handle.name)
        for start in range(0, len(rows), _BATCH):
            commands = [("XADD", stream_name(), "*", "row", row) for row in rows[start:start + _BATCH]]
            raise_errors(await get_resp().execute_many(commands))
        os.unlink(handle.name)
        handle.close()  # releases the lock
        return len(rows)

    def _give_back(self, handle) -> None:
        """A file we could not send: ours again if it was ours, else unlocked for anyone."""
        if self._file is None and handle.mode == "ab":
            self._file = handle
        else:
            handle.close()


def spooled_files() -> int:
    """Spool files on this host waiting for Redis (every process's, for /status)."""
    folder = _spool.folder()
    return sum(1 for _ in folder.glob("*.jsonl")) if folder.is_dir() else 0


def _fsync_file_and_folder(fd: int, folder: str) -> None:
    os.fsync(fd)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _rows_of(path: str) -> list[bytes]:
    with open(path, "rb") as reader:
        return [line.rstrip(b"\n") for line in reader if line.strip()]


_spool = _Spool()


async def flush_pending() -> None:
    """Send spooled rows (this process's and dead processes') once Redis answers; called every
    second and at shutdown."""
    if not _spool.has_rows() and not _orphans_possible():
        return
    await _spool.sync()
    try:
        sent = await _spool.send()
    except Exception:
        return  # still away; next round
    if sent:
        log.info("re-sent spooled usage rows", extra={"rows": sent})


_last_look = 0.0


def _orphans_possible() -> bool:
    """Look for dead processes' spool files at most every 10 s (a directory listing)."""
    global _last_look
    now = time.monotonic()
    if now - _last_look < 10:
        return False
    _last_look = now
    folder = _spool.folder()
    return folder.is_dir() and any(folder.glob("*.jsonl"))

