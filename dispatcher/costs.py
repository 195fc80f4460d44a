"""What SMS costs: a price per part per provider (``DISPATCH_PART_PRICES``, CNY), estimates and budgets.

Carriers bill per part (sms.py counts them exactly as they bill: signature and opt-out text
included), so a message of three parts costs three times the provider's part price. Spend
already incurred is counted from the parts each provider accepted, at the price recorded with
the run (store: ``run_prices``); an estimate before a run prices every part at the dearest
provider the campaign may send through, so a failover can never take a run over its budget.
Ringback enrolments are not priced: carriers bill the tone by subscription, not per number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def cny(amount: float) -> float:
    """An amount as reports show it: yuan to the fen."""
    return round(amount + 0.0, 2)


def estimate_price(gateways: Iterable[str], prices: Mapping[str, float]) -> float:
    """The price per part an estimate uses: the dearest of the providers a run may send through."""
    return max((prices.get(name, 0.0) for name in gateways), default=0.0)


def over_budget(budget: float | None, parts: int, price: float) -> str | None:
    """Why a run of ``parts`` at ``price`` may not start under ``budget`` (None: it may)."""
    if budget is None:
        return None
    cost = parts * price
    if cost <= budget + 1e-9:
        return None
    return (
        f"estimated cost {cny(cost):.2f} CNY ({parts} parts at {price:g} CNY) is over the budget of "
        f"{budget:g} CNY: nothing written or sent"
    )
