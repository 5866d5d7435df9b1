"""How far an event's own ``occurred_at`` is believed: not further ahead than this service's clock.

A stamp is chosen by whoever sent the event. A few seconds of skew count as they are; one
years ahead (a valid event) would otherwise stay the latest, the most recent or inside
every window for good. As in the budget (event time) and the router (automation TTLs),
such a stamp counts as this service's clock plus the skew when it is folded.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["EVENT_TIME_AHEAD", "not_ahead"]

EVENT_TIME_AHEAD = timedelta(seconds=60)


def not_ahead(stamp: datetime, now: datetime) -> datetime:
    """``stamp``, or ``now`` plus :data:`EVENT_TIME_AHEAD` when it is further ahead."""
    return min(stamp, now + EVENT_TIME_AHEAD)
