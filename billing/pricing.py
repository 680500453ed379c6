"""Exact cost in USD from a lane's prices per million tokens (Decimal, never float)."""

from decimal import Decimal

MILLION = Decimal(1_000_000)


def cost_usd(
    price_input: Decimal,
    price_output: Decimal,
    price_cached_input: Decimal,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_creation_tokens: int = 0,
) -> Decimal:
    """Cached prompt tokens bill at the cached price; the rest of the prompt at the input price.

    `prompt_tokens` includes cached and cache-creation tokens (OpenAI's convention); cache
    creation bills at the input price.
    """
    cached = min(cached_tokens, prompt_tokens)
    uncached = prompt_tokens - cached
    total = uncached * price_input + cached * price_cached_input + completion_tokens * price_output
    return total / MILLION
