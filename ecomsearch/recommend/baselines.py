"""The two baselines every recommender is measured against: the most purchased products, and the
customer's own products by purchase count, then the most purchased ("buy it again")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ecomsearch.recommend.transactions import Basket


def popular_products(baskets: Iterable[Basket], k: int) -> list[str]:
    """The k products in most baskets (ties: first bought first)."""
    counts: Counter[str] = Counter()
    for basket in baskets:
        counts.update(basket.products)
    return [product for product, _ in counts.most_common(k)]


class RepeatThenPopular:
    """A customer's products by the number of their baskets holding each (ties: bought last
    first), then the popular products they have not bought."""

    def __init__(self, popular: list[str]) -> None:
        self.popular = popular
        self.counts: dict[str, dict[str, list[float]]] = {}

    def add(self, basket: Basket) -> None:
        own = self.counts.setdefault(basket.customer, {})
        for product in basket.products:
            entry = own.setdefault(product, [0, 0.0])
            entry[0] += 1
            entry[1] = max(entry[1], basket.timestamp_s)

    def recommend(self, customer: str, k: int) -> list[str]:
        own = self.counts.get(customer, {})
        ranked = sorted(own, key=lambda product: (-own[product][0], -own[product][1]))[:k]
        seen = set(ranked)
        ranked += [product for product in self.popular if product not in seen]
        return ranked[:k]
