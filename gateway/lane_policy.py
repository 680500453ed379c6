"""A lane's resilience policy (timeouts, retries, circuit breaker, upstream budget) with defaults.

Operators set any part of it per lane in the routes file; what they leave out comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from django.conf import settings


@dataclass(frozen=True, slots=True)
class Timeouts:
    total_s: float = 0.0  # 0 = GW_UPSTREAM_TIMEOUT
    idle_s: float = 60.0  # longest silence between stream chunks (and before the first)
    connect_s: float = 0.0  # 0 = GW_UPSTREAM_CONNECT_TIMEOUT


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int = 3  # per lane, first try included
    max_total_s: float = 30.0  # budget for all attempts on all lanes of one request
    base_ms: int = 100
    cap_ms: int = 4000


@dataclass(frozen=True, slots=True)
class Breaker:
    error_rate: float = 0.5  # open when failures / calls over the window reach this ...
    min_calls: int = 10  # ... with at least this many calls in the window
    window_s: int = 60
    cooldown_s: float = 15.0  # open -> half-open after this long
    probes: int = 1  # calls let through at once while half-open
    close_after: int = 3  # consecutive probe successes that close it
    slow_ms: int = 0  # a call slower than this counts as a failure (brownout); 0 = off


@dataclass(frozen=True, slots=True)
class UpstreamBudget:
    rpm: int = 0  # the provider account's requests/min (0 = not enforced)
    tpm: int = 0  # and tokens/min


@dataclass(frozen=True, slots=True)
class LanePolicy:
    timeouts: Timeouts
    retry: Retry
    breaker: Breaker
    limits: UpstreamBudget

    SECTIONS = {"timeouts": Timeouts, "retry": Retry, "breaker": Breaker, "limits": UpstreamBudget}

    @property
    def total_s(self) -> float:
        return self.timeouts.total_s or settings.GATEWAY["UPSTREAM_TIMEOUT"]


class PolicyError(ValueError):
    pass


def _section(cls, raw, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a mapping")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        if name not in known:
            raise PolicyError(f"{where}.{name}: unknown field (known: {', '.join(known)})")
        kind = int if known[name].type == "int" else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise PolicyError(f"{where}.{name}: must be a non-negative number")
        if kind is int and value != int(value):
            raise PolicyError(f"{where}.{name}: must be a whole number")
        values[name] = kind(value)
    return cls(**values)


def parse_policy(options: dict, where: str = "lane") -> LanePolicy:
    return LanePolicy(**{name: _section(cls, options.get(name), f"{where}.{name}")
                         for name, cls in LanePolicy.SECTIONS.items()})


def policy_for(lane) -> LanePolicy:
    """The lane's parsed policy: parsed once when the route table is loaded (LaneSpec.policy)."""
    policy = getattr(lane, "policy", None)
    if policy is None:
        policy = parse_policy(lane.options)
    return policy
