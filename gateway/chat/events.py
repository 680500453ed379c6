"""What the chat session yields: protocol-neutral events that every front door renders.

A call's events come in one of two orders:

    stream:  Start, Delta..., [Delta usage-only], Finish | Failed
    JSON:    Start, Completed, Finish

A failure before `Start` is raised as a `GatewayError` (the front door has sent nothing yet: an
HTTP door answers with that status); after `Start` it arrives as a `Failed` event (an HTTP door
has sent its status and ends its stream with an error event).

`Delta` is the provider's chunk itself, not a copy: the OpenAI front door forwards its bytes
untouched when the lane spoke OpenAI's protocol (the hot path's speed), while other doors read
its neutral accessors (`choices()`: text, tool-call, reasoning deltas, finish reason) and
`usage`. `seq` numbers events the way the resumable store does, so a door can label them
(SSE `id:`) and a client can resume after any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GatewayError
from ..types import ChoiceDelta, Chunk, Completion, Usage

Delta = Chunk  # the streamed delta event (see gateway/types.py)

__all__ = ["ChoiceDelta", "Completed", "Delta", "Event", "Failed", "Finish", "Start"]


@dataclass(slots=True)
class Start:
    """The call is admitted and answering: what a door needs before the first byte."""

    call_id: str  # the platform's id for this call (usage row, stream store, idempotency)
    model: str  # the public model name the caller asked for
    upstream_model: str
    provider: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # rate limits, upstream, retries...
    stream_id: str | None = None  # set when the events are kept: resume with this id
    replayed: bool = False  # an Idempotency-Key replay of an earlier call's events
    original_call_id: str | None = None  # the call being replayed
    prompt_tokens: int = 0  # the platform's count of the prompt (0 for a replay)

    kind = "start"


@dataclass(slots=True)
class Completed:
    """A whole (non-streamed) answer."""

    completion: Completion

    kind = "completed"


@dataclass(slots=True)
class Finish:
    """The answer ended normally."""

    seq: int = 0
    usage: Usage | None = None
    finish_reason: str | None = None

    kind = "finish"


@dataclass(slots=True)
class Failed:
    """The answer failed after it started (a door renders it as its protocol's error event)."""

    error: GatewayError
    seq: int = 0

    kind = "error"


Event = Start | Delta | Completed | Finish | Failed
