"""Admission and settlement of one request: the operations that admit it (or its admission from
this process's lease) and settle it, and what its answer's headers say."""

from __future__ import annotations

from decimal import Decimal

from tenants.principal import Principal

from ..errors import GatewayError
from . import wire
from .batching import _batcher
from .leases import LEASE_SLOTS, Lease, _lease_id
from .policy import _headers, _Plan, _plan_for, _refusal, nano, unavailable
from .wire import Operation


class Admission:
    """A request let in: what it reserved, and the x-ratelimit-* headers of its answer."""

    __slots__ = ("request_id", "tenant_id", "plan", "reserved_tokens", "estimate_nano", "header_pairs",
                 "release_first", "lease", "lease_wanted", "lease_id")

    def __init__(self, request_id: str, tenant_id: int, plan: _Plan, reserved_tokens: int = 0,
                 estimate_nano: int = 0) -> None:
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.plan = plan
        self.reserved_tokens = reserved_tokens
        self.estimate_nano = estimate_nano
        self.header_pairs: list[tuple[bytes, bytes]] = []  # as the response carries them
        # Once it was admitted, a limit that its settlement gives back to (its slot, the tokens
        # it reserved beyond what it uses, its estimated spend) had room for fewer than two more
        # requests like it: its settlement goes to Redis before its answer's last bytes go to the
        # client, so that the client's next request, to any process, sees what it gave back.
        self.release_first = False
        self.lease: Lease | None = None  # admitted by this process from that lease
        self.lease_wanted = 0  # the units of lease its admission asked for
        self.lease_id = ""  # and the id it asked for it under

    @property
    def headers(self) -> dict[str, str]:
        return {name.decode(): value.decode() for name, value in self.header_pairs}

    @property
    def slot_keys(self) -> list[str]:
        return self.plan.slot_keys

    @property
    def slot_members(self) -> tuple[str, ...]:
        """Its concurrency slot's member in each slot set: its own, or its lease's (all of them)."""
        return self.lease.members() if self.lease is not None else (self.request_id,)


def prepare_admission(principal: Principal, request_id: str, tokens: int,
                      estimate: int) -> tuple[Admission, Operation | None] | tuple[None, None]:
    """The admission operation for this request, or (admission, None) when this process admitted
    it from a lease; (None, None) when the principal has no limits (nothing to admit or settle:
    its usage row is a plain XADD)."""
    plan = _plan_for(principal)
    if not plan.scopes:
        return None, None
    if plan.token_capacity is not None and tokens > plan.token_capacity:
        raise GatewayError(400, f"This request needs {tokens} tokens but the limit is {plan.token_capacity} tokens "
                                "per minute; lower max_tokens or shorten the prompt.",
                           code="request_exceeds_limit", param="max_tokens")
    admission = Admission(request_id, principal.tenant_id, plan, tokens, estimate)
    want = 0
    if plan.leasable:
        batcher = _batcher()
        lease = batcher.leases.get(id(plan))
        if lease is not None and lease.admit(admission):
            return admission, None
        want = batcher.lease_wanted(plan)
    if want:
        admission.lease_wanted = want
        admission.lease_id = _lease_id()
        return admission, wire.admit_with_lease(plan, request_id, tokens, estimate, want, admission.lease_id,
                                                LEASE_SLOTS)
    return admission, wire.admit(plan, request_id, tokens, estimate)


def finish_admission(admission: Admission, result) -> Admission:
    """Turn the admission's reply into headers, or raise the refusal (503 if Redis failed)."""
    if admission.lease_wanted:
        _batcher().lease_came(admission.plan, admission.lease_id, admission.reserved_tokens, admission.estimate_nano,
                              result)
    if isinstance(result, Exception):
        raise unavailable() from None
    if not result["ok"]:
        raise _refusal(admission.plan.by_tag[result["limit"].decode()], int(result["retry_ms"]), {})
    admission.header_pairs = _headers(admission.plan.header_kinds, result)
    admission.release_first = result["crowded"] == 1
    return admission


def settle_operation(admission: Admission, used_tokens: int, cost: Decimal) -> Operation:
    """Refund or charge tokens, release the slot, settle spend: one operation. (The usage row is
    `billing.recorder`'s: it may ride in the same write, `submit(..., rider=...)`.)"""
    return wire.settle(admission.plan, admission.request_id, admission.reserved_tokens - used_tokens,
                       nano(cost) - admission.estimate_nano)


def settle_locally(admission: Admission, used_tokens: int, cost: Decimal) -> None:
    """Settle a request admitted from a lease into that lease (its row goes to the usage stream
    as it is: `billing.recorder.record`)."""
    admission.lease.settle(admission, used_tokens, nano(cost))

