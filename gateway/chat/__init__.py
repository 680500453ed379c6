"""The chat core: one protocol-neutral chat service behind every front door.

A front door parses its protocol into a `ChatRequest`, runs a `ChatSession` and renders its
events (gateway/chat/events.py) in its wire format; limits, routing, resilience, idempotency,
resume, structured output, cancellation and usage are the session's.
"""

from .call import CallContext, ChatCall, drain_settling, open_call, resolve_route
from .cancel import CancelToken, run_cancellable
from .events import Completed, Delta, Failed, Finish, Start
from .session import ChatSession, resume

__all__ = ["CallContext", "CancelToken", "ChatCall", "ChatSession", "Completed", "Delta", "Failed", "Finish",
           "Start", "drain_settling", "open_call", "resolve_route", "resume", "run_cancellable"]
