"""Retry delays shared by everything that reconnects or re-reads."""

from __future__ import annotations

import random
from collections.abc import Iterator


def jittered_backoff(
    initial: float = 0.25, maximum: float = 5.0, factor: float = 2.0
) -> Iterator[float]:
    """Capped exponential delays with full jitter, so many proxies do not reconnect in step."""
    delay = initial
    yield 0.0
    while True:
        yield random.uniform(initial, delay)
        delay = min(maximum, delay * factor)
