"""The readiness a claim found, kept for the readiness read that follows it.

An executor whose claim took fewer intents than it asked for asks for readiness next. The
server stores compute that answer inside the claim's own round trip and keep it here: the
next ``readiness()`` under the same gates, if soon enough, gets it without a read. Whatever
has made something claimable since moved the change counter, so an executor waiting on the
counter it read before that claim still wakes for it.
"""

from __future__ import annotations

import time

from farmhand.store.base import Readiness

#: how long (seconds) a kept answer stays good for the next readiness()
FRESH = 0.05


class KeptReadiness:
    """One kept answer, for the gates (``scope``) it was computed under; answered once."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: tuple[object, Readiness, float] | None = None

    def keep(self, scope: object, answer: Readiness) -> None:
        """Keep ``answer``, found under ``scope``, for the next :meth:`take`."""
        self._kept = (scope, answer, time.monotonic())

    def drop(self) -> None:
        """Forget the kept answer: a write may have changed it."""
        self._kept = None

    def take(self, scope: object) -> Readiness | None:
        """The kept answer if it was found under ``scope`` within :data:`FRESH` seconds,
        else None; either way it is not kept any longer."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == scope and time.monotonic() - kept[2] <= FRESH:
            return kept[1]
        return None
