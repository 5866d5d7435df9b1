"""What a task's LLM call can cost at most: held by the budget, and by admission tokens.

The budget holds a task's worst case until its real cost is known; an admission token
(see ``AdmissionGranted``) holds the worst case of a request of a given size, and the
router that holds it admits only tasks whose own worst case fits. Both compute it here,
from the same settings, so they agree on what fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from streams.config import BudgetSettings
from streams.llm import LLMSettings, ModelPrice, PriceTable, worst_case_usd
from streams.workflows import MAX_PROMPT_CHARS

__all__ = ["WorstCase", "context_text"]


def context_text(context: Mapping[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in sorted(context.items()))


@dataclass(frozen=True)
class WorstCase:
    """A task's worst case: every one of ``max_tokens`` generated and a token per byte of
    the prompt (the system prompt at its largest), at the dearest price the table knows,
    and never less than ``reserve_usd``."""

    prices: PriceTable = field(default_factory=lambda: LLMSettings.read("prices", {}))
    max_tokens: int = 512
    # The loader cuts the system prompt to MAX_PROMPT_CHARS characters, 4 UTF-8 bytes each.
    system_prompt_tokens: int = 4 * MAX_PROMPT_CHARS
    reserve_usd: float = 0.002

    @classmethod
    def from_env(cls) -> WorstCase:
        budget = BudgetSettings.from_env()
        return cls(
            prices=LLMSettings.price_table(),
            max_tokens=LLMSettings.read("max_tokens"),
            system_prompt_tokens=budget.system_prompt_tokens,
            reserve_usd=budget.task_reserve_usd,
        )

    @cached_property
    def dearest_prices(self) -> PriceTable:
        """Every model at the dearest input and output price of the table.

        Nobody holding money for a call knows which model it will use: an agent keeps the
        model it was spawned with after ``ORCH_LLM_MODEL`` changes, and the loader prices a
        call by the model the endpoint reports, an unknown one at the table's default.
        """
        known = [*self.prices.prices.values(), self.prices.default]
        top = ModelPrice(max(p.input_per_m for p in known), max(p.output_per_m for p in known))
        return PriceTable({}, top)

    @cached_property
    def _system_placeholder(self) -> dict[str, str]:
        return {"role": "system", "content": "x" * self.system_prompt_tokens}

    def task(self, message: str, context: Mapping[str, str]) -> float:
        """The most an answer to ``message`` can cost: the loader's messages, bounded."""
        messages = [
            self._system_placeholder,
            {"role": "system", "content": "Request context: " + context_text(context)},
            {"role": "user", "content": message},
        ]
        worst = worst_case_usd(self.dearest_prices, "any", messages, self.max_tokens)
        return max(self.reserve_usd, worst)

    def request_of(self, size: int) -> float:
        """The worst case of any request whose message and context text take ``size`` bytes."""
        return self.task("x" * max(0, size), {})

    def fits(self, message: str, context: Mapping[str, str], hold_usd: float) -> bool:
        return self.task(message, context) <= hold_usd + 1e-12
