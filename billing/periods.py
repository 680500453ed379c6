"""Money and budget periods, as limits and billing count them.

Money in Redis is integer nano-dollars; a price in USD per million tokens is exactly 1000
nano-dollars per token per unit of price. Budgets count per UTC day and UTC month.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from decimal import Decimal

NANO = Decimal(1_000_000_000)

Periods = tuple[tuple[str, int], tuple[str, int]]  # (day label, seconds left), (month label, seconds left)


def nano(amount: Decimal) -> int:
    """`amount` USD in nano-dollars, rounded up."""
    return math.ceil(amount * NANO)  # Decimal's ceiling: exact


def period_ends(now: datetime) -> Periods:
    """(day label, seconds left today), (month label, seconds left this month)."""
    day_end = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp() + 86400
    month_end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    ts = now.timestamp()
    return (now.strftime("%Y-%m-%d"), int(day_end - ts) + 1), (now.strftime("%Y-%m"), int(month_end - ts) + 1)


_periods: tuple[int, Periods | tuple] = (-1, ())


def current_periods() -> Periods:
    """The budget periods now, computed at most once a second."""
    global _periods
    second = int(time.time())
    if _periods[0] != second:
        _periods = (second, period_ends(datetime.now(UTC)))
    return _periods[1]


def budget_ttl_ms(month_seconds_left: int) -> int:
    """A scope hash with budgets outlives its month by a day."""
    return (month_seconds_left + 86400) * 1000
