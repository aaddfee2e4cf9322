"""Backoff between attempts: exponential ceiling with equal jitter, never below Retry-After."""

from __future__ import annotations

import random

from farmhand.config import RetryConfig


def backoff(
    attempt: int,
    config: RetryConfig,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    ceiling = min(config.max_delay, config.base_delay * 2 ** max(0, attempt - 1))
    # equal jitter: at least half the ceiling, so delays still grow, but spread out so
    # executors that failed together do not retry together
    delay: float = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
