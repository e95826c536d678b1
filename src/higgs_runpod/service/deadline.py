"""REQUEST_TIMEOUT_S around one call (`in_time`) or one stream (`within`).

Past the deadline the awaited work is cancelled, which stops generation at the engine's
next step (SpeechService.generate turns the cancellation into the engine's cancel event),
and `RequestTimeout` is raised for the front to map.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from higgs_runpod.errors import RequestTimeout

T = TypeVar("T")


async def in_time(timeout_s: float, work: Awaitable[T]) -> T:
    """`work` within `timeout_s`; past it, it is cancelled and `RequestTimeout` raised."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if deadline.expired():
            raise RequestTimeout(timeout_s) from None
        raise


async def within(timeout_s: float, items: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """`items` until `timeout_s` from now; then the one being awaited is cancelled (a
    stream's generation with it) and `RequestTimeout` is raised.

    The deadline bounds each wait for the next item, never the caller's handling of it,
    so it can wrap a generator whose consumer is another task (a response body).
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    item = await anext(items)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if scope.expired():
                    raise RequestTimeout(timeout_s) from None
                raise
            yield item
    finally:
        await items.aclose()
