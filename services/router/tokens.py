"""Admission tokens one router instance holds: slots and money the budget set aside for it.

With ``ORCH_ADMISSION_TOKENS`` > 0 the router asks the budget, on the tasks it sends
anyway, for tokens of the task's goal. Each token is a ``max_concurrent`` slot and the
worst case of a request up to a size, both held by the budget from its grant. A task
that fits a token is admitted here: the router tells the budget (the task names the
token) and the loader (``task_admitted`` with the token's start deadline) at once, so
the answer never waits for the budget's decision.

A token is used only in the first half of its life (its grant to its ``bind_by``), so
the loader has the second half to start the task; one not used by then is given back.
Its life runs from the grant's stamp, or from the router's clock plus a minute's skew
when the grant is stamped further ahead, and lasts no longer than the token life the
router knows (``ORCH_ADMISSION_TOKEN_SECONDS``): a grant stamped ahead, or naming a
``bind_by`` far ahead, never makes a token that does not lapse.
The budget takes a token's slot back by itself only once no task it let start can still
run, so a router that dies with tokens costs the goal their slots for a while, never a
limit passed.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.router.settings import not_ahead
from streams.admission import WorstCase
from streams.events import AdmissionGranted, AdmissionReturned

__all__ = ["AdmissionTokens", "Token"]

SOURCE = "router"
# Seconds after an ask with no grant seen before the same goal is asked for again.
_ASK_AGAIN_SECONDS = 1.0
# Tokens remembered as granted: a grant read again comes within the budget's redelivery
# window (its uncommitted input after a crash), far fewer tokens than this.
_KNOWN_TOKENS = 100_000


@dataclass(frozen=True)
class Token:
    token: str
    use_by: datetime  # this router's last moment to admit a task with it
    bind_by: datetime  # the task's start deadline
    hold_usd: float


class AdmissionTokens:
    def __init__(
        self,
        want: int,
        worst: WorstCase | None = None,
        *,
        holder: str | None = None,
        max_goals: int = 10_000,
        life_seconds: float | None = None,
    ) -> None:
        self.want = max(0, want)
        self.worst = worst or WorstCase.from_env()
        # One per process: a restarted router never uses what its earlier life was given.
        self.holder = holder or uuid.uuid4().hex
        self.max_goals = max(1, max_goals)
        # The longest life a token has here (the budget's ORCH_ADMISSION_TOKEN_SECONDS);
        # None: as long as its grant says.
        self.life = timedelta(seconds=life_seconds) if life_seconds is not None else None
        self._stock: OrderedDict[str, deque[Token]] = OrderedDict()
        self._asked: dict[str, datetime] = {}
        self._lapsed: dict[str, list[str]] = {}
        # Every token ever granted here, so that a grant read again (the budget sends the
        # same grant when it reads the ask again) never brings back one used or returned.
        self._known: OrderedDict[str, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.want > 0

    def held(self, goal: str) -> int:
        return len(self._stock.get(goal, ()))

    def granted(self, event: AdmissionGranted, now: datetime) -> None:
        """A grant read from the log at ``now``: kept if it names this instance."""
        if not self.enabled or event.holder != self.holder:
            return
        self._asked.pop(event.goal_id, None)
        # A grant stamped in year 8999 made tokens this instance used, and tasks that could
        # start, for good: its life runs from no later than now (and a skew), for no longer
        # than a token lives. An honest grant keeps its own times.
        start = not_ahead(event.occurred_at, now)
        life = event.bind_by - event.occurred_at
        if self.life is not None:
            life = min(life, self.life)
        use_by, bind_by = start + life / 2, start + life
        stock = self._stock.setdefault(event.goal_id, deque())
        self._stock.move_to_end(event.goal_id)
        for token in event.tokens:
            if token in self._known:
                continue
            self._known[token] = None
            stock.append(Token(token, use_by, bind_by, event.hold_usd))
        while len(self._known) > _KNOWN_TOKENS:
            self._known.popitem(last=False)
        while len(self._stock) > self.max_goals:
            goal, old = self._stock.popitem(last=False)
            self._lapsed.setdefault(goal, []).extend(t.token for t in old)

    def take(
        self, goal: str, message: str, context: Mapping[str, str], now: datetime
    ) -> Token | None:
        """A token of ``goal`` this task fits, no longer this instance's to use; None: none."""
        stock = self._stock.get(goal)
        if not stock:
            return None
        self._expire(goal, stock, now)
        if not stock:
            return None
        worst = self.worst.task(message, context)
        for token in stock:
            if worst <= token.hold_usd + 1e-12:
                stock.remove(token)
                return token
        return None

    def ask(self, goal: str, now: datetime) -> int:
        """How many tokens of ``goal`` to ask for on the task about to be sent (0: none).

        Asked for when half or fewer are left, for the rest, and not again until a grant
        comes or a second has passed (the budget gives none while the goal has tasks
        waiting, or no slot or money is free)."""
        if not self.enabled:
            return 0
        have = self.held(goal)
        if have > self.want // 2:
            return 0
        asked = self._asked.get(goal)
        if asked is not None and (now - asked).total_seconds() < _ASK_AGAIN_SECONDS:
            return 0
        self._asked[goal] = now
        if len(self._asked) > self.max_goals:
            self._asked.pop(next(iter(self._asked)))
        return self.want - have

    def _expire(self, goal: str, stock: deque[Token], now: datetime) -> None:
        while stock and stock[0].use_by <= now:
            self._lapsed.setdefault(goal, []).append(stock.popleft().token)
        if any(t.use_by <= now for t in stock):  # grants read out of order
            kept = [t for t in stock if t.use_by > now]
            lapsed = [t.token for t in stock if t.use_by <= now]
            self._lapsed.setdefault(goal, []).extend(lapsed)
            stock.clear()
            stock.extend(kept)

    def returns(self, now: datetime, *, everything: bool = False) -> list[AdmissionReturned]:
        """What this instance will not use (``everything``: on a clean stop), to tell the
        budget; the tokens are forgotten here first, so none is used after it is told."""
        for goal, stock in list(self._stock.items()):
            if everything:
                self._lapsed.setdefault(goal, []).extend(t.token for t in stock)
                stock.clear()
            else:
                self._expire(goal, stock, now)
            if not stock:
                del self._stock[goal]
        out = [
            AdmissionReturned(
                source=SOURCE,
                goal_id=goal,
                holder=self.holder,
                tokens=tokens[i : i + 64],
                occurred_at=now,
            )
            for goal, tokens in self._lapsed.items()
            for i in range(0, len(tokens), 64)
        ]
        self._lapsed.clear()
        return out
