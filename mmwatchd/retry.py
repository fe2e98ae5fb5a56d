"""How a file's failed tries end: the retry policy, one value instead of a branch at every decision.

The service never gives up on a file for an outage: only answers that count against the file (408/409/5xx and
timeouts, see :attr:`~mmwatchd.errors.VLMUnavailable.counts_against_file`) do, up to ``endpoint.max_attempts``, and
they are counted in the state store so that a restart does not reset them. ``once`` and ``scan`` must end: they
give up on a file after a few tries of any kind, and stop altogether when going on cannot help (the daily cap is
used up, the endpoint refuses every request).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mmwatchd.endpoint import EndpointRefuses, QuotaReached
from mmwatchd.errors import (
    MmwatchdError,
    SidecarError,
    VLMMisconfigured,
    VLMUnavailable,
)

#: Backoff for transient failures of one file.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``give_up_after``: a one-shot run's tries per file (of any kind); None for the service."""

    give_up_after: int | None = None

    @property
    def one_shot(self) -> bool:
        """Tries are counted in memory and every kind counts; the run ends when the work does."""
        return self.give_up_after is not None

    def last_attempt(self, attempts_so_far: int, max_attempts: int) -> bool:
        """Is the try about to start the file's last (the service's count, kept in the state store)?"""
        return not self.one_shot and attempts_so_far + 1 >= max_attempts

    def final(self, attempts: int, error: MmwatchdError | None) -> bool:
        """After ``attempts`` failed tries ending in ``error``: give the file up now? A folder that cannot take
        sidecars will not take them a few seconds later either, so a one-shot run says so at once."""
        if self.give_up_after is None:
            return False
        return attempts >= self.give_up_after or isinstance(error, (VLMMisconfigured, SidecarError))

    def halts(self, error: MmwatchdError | None) -> bool:
        """Does ``error`` end a one-shot run (the daily cap, an endpoint refusing everything)?"""
        return self.one_shot and isinstance(error, QuotaReached | EndpointRefuses)

    def records_attempts(self) -> bool:
        """Are counted tries kept in the state store (the service's, which outlive a restart)?"""
        return not self.one_shot

    @staticmethod
    def delay(attempts: int, error: MmwatchdError | None, retry_after: float | None) -> float:
        """Seconds until the next try: exponential with jitter, at least what the server asked for; an endpoint
        that did not answer is retried soon, since the gate holds work until it is back."""
        if isinstance(error, VLMUnavailable) and error.status is None and retry_after is None:
            return RETRY_BASE_S
        backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)
        return max(backoff, retry_after or 0.0)
