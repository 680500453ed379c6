"""One way to stop a call, whoever asks: a client that hangs up, a Stop button, a cancelled job.

    token = CancelToken()
    stopped = await run_cancellable(token, consume(session))   # in the task that runs the call
    ...
    token.cancel("stopped")                                     # from anywhere on the same loop

Cancelling cancels the task running the call, so the upstream request is closed where it
stands (the provider stops generating), and the call's settlement, shielded from cancellation,
releases its concurrency slot and records a usage row marked partial with what was consumed
and the token's reason as its error code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import TypeVar

T = TypeVar("T")

CLIENT_GONE = "client_disconnected"  # an HTTP client hung up
STOPPED = "stopped"  # a person pressed Stop
CANCELLED = "cancelled"  # a job was cancelled
SHUTDOWN = "server_shutdown"  # the process is going away


class CancelToken:
    __slots__ = ("reason", "_task")

    def __init__(self) -> None:
        self.reason: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def bind(self, task: asyncio.Task | None = None) -> None:
        """The task whose work this token cancels (default: the current one)."""
        self._task = task or asyncio.current_task()
        if self.reason is not None:  # cancelled before it started
            self._task.cancel()

    def cancel(self, reason: str = CANCELLED) -> bool:
        """Stop the call (once; later reasons are ignored). False if it was already cancelled."""
        if self.reason is not None:
            return False
        self.reason = reason
        if self._task is not None and not self._task.done():
            self._task.cancel()
        return True


async def run_cancellable(token: CancelToken, work: Awaitable[T], alongside: Coroutine | None = None) -> T | None:
    """Run `work` in the current task until it ends or `token` cancels it (then None);
    `alongside` (e.g. a watch for the client hanging up) runs in a task of its own meanwhile.

    A cancellation that did not come from the token (the task itself being cancelled by its
    owner) propagates as usual."""
    me = asyncio.current_task()
    token.bind(me)
    helper = asyncio.ensure_future(alongside) if alongside is not None else None
    try:
        return await work
    except asyncio.CancelledError:
        if token.reason is None:
            raise
        me.uncancel()
        return None
    finally:
        if helper is not None:
            helper.cancel()
        token._task = None
        if token.reason is not None and me.cancelling():
            me.uncancel()
