"""What the recommender knows from the event log, kept up to date event by event.

`Interactions.apply` takes the log in seq order, a few events or the whole history at once, and
the state it reaches is the same either way (a test checks it): per user, the products bought
(in how many baskets, when last) and the products recently interacted with; per product, how
many baskets hold it, how many shoppers bought it and bought it again, and a popularity that
decays with a half-life; per pair of products, how many baskets hold both.

Time is the log's: `clock_s` is the newest event time seen, and "days since" and the decay are
measured from it, so a replay of old events behaves as it did when they happened.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ecomsearch import contract

DAY_S = 86_400.0
# A shopper's purchases within this long of the basket's first are one basket ("bought
# together"): one invoice in a shop's export, one checkout with a second thought online.
BASKET_WINDOW_S = 3600.0
POPULARITY_HALF_LIFE_DAYS = 14.0
# Pairs are counted in baskets up to this many distinct products: a wholesale restock of
# hundreds of lines says little about which two go together, and costs its size squared.
MAX_PAIR_BASKET_ITEMS = 100
# Products a user interacted with last (any kind): what "recent items" means for co-purchase
# and embedding features.
RECENT_ITEMS = 20
# Co-purchase pairs held in dictionaries before they are merged into the sparse matrix.
MERGE_PAIRS = 50_000

PURCHASE = contract.EVENT_KINDS.index("purchase")


@dataclass
class UserHistory:
    """One shopper's purchases and recent interactions."""

    # key -> [baskets holding it, time of the last purchase (s)]
    items: dict[int, list] = field(default_factory=dict)
    baskets: int = 0
    last_purchase_s: float = -math.inf
    basket_start_s: float = -math.inf
    basket: list[int] = field(default_factory=list)
    # key -> time of the last interaction of any kind, oldest first (re-inserted on each)
    recent: dict[int, float] = field(default_factory=dict)

    def recent_keys(self, limit: int = RECENT_ITEMS) -> list[int]:
        """The products interacted with last, most recent first."""
        keys = list(self.recent)
        return keys[::-1][:limit]


class CoPurchase:
    """Symmetric basket co-occurrence counts: a sparse matrix plus the pairs added since it was
    last rebuilt (small updates must not rebuild it)."""

    def __init__(self) -> None:
        from scipy import sparse

        self._sparse = sparse
        self.matrix = sparse.csr_matrix((0, 0), dtype=np.float32)
        self.pending: dict[int, dict[int, float]] = {}
        self.pending_pairs = 0

    def add(self, first: np.ndarray, second: np.ndarray) -> None:
        """Counts one basket co-occurrence for each pair (first[i], second[i]), both ways."""
        if len(first) >= MERGE_PAIRS:
            self._merge_arrays(np.asarray(first), np.asarray(second))
            return
        for a, b in zip(np.asarray(first).tolist(), np.asarray(second).tolist(), strict=True):
            row = self.pending.setdefault(a, {})
            row[b] = row.get(b, 0.0) + 1.0
            row = self.pending.setdefault(b, {})
            row[a] = row.get(a, 0.0) + 1.0
        self.pending_pairs += len(first)
        if self.pending_pairs >= MERGE_PAIRS:
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        rows, cols, values = [], [], []
        for a, row in self.pending.items():
            rows.extend([a] * len(row))
            cols.extend(row)
            values.extend(row.values())
        self.pending, self.pending_pairs = {}, 0
        self._add_matrix(np.asarray(rows), np.asarray(cols), np.asarray(values, np.float32))

    def _merge_arrays(self, first: np.ndarray, second: np.ndarray) -> None:
        rows = np.concatenate([first, second])
        cols = np.concatenate([second, first])
        self._add_matrix(rows, cols, np.ones(len(rows), dtype=np.float32))

    def _add_matrix(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        size = max(self.matrix.shape[0], int(rows.max()) + 1, int(cols.max()) + 1)
        added = self._sparse.csr_matrix((values, (rows, cols)), shape=(size, size))
        if self.matrix.shape[0] != size:
            self.matrix.resize((size, size))
        self.matrix = (self.matrix + added).tocsr()

    def row(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """The products bought with `key` and in how many baskets: (keys int64, counts)."""
        if key < self.matrix.shape[0]:
            start, end = self.matrix.indptr[key], self.matrix.indptr[key + 1]
            keys = self.matrix.indices[start:end].astype(np.int64)
            counts = self.matrix.data[start:end].astype(np.float64)
        else:
            keys, counts = np.empty(0, np.int64), np.empty(0, np.float64)
        extra = self.pending.get(key)
        if extra:
            keys = np.concatenate([keys, np.fromiter(extra, np.int64, len(extra))])
            counts = np.concatenate([counts, np.fromiter(extra.values(), np.float64, len(extra))])
            keys, inverse = np.unique(keys, return_inverse=True)
            counts = np.bincount(inverse, weights=counts)
        return keys, counts


class Interactions:
    """The event log's statistics; see the module docstring. Not thread-safe: the serving
    models apply events and read under their own lock."""

    def __init__(
        self,
        half_life_days: float = POPULARITY_HALF_LIFE_DAYS,
        basket_window_s: float = BASKET_WINDOW_S,
    ) -> None:
        self.half_life_s = half_life_days * DAY_S
        self.basket_window_s = basket_window_s
        self.users: dict[str, UserHistory] = {}
        self.copurchase = CoPurchase()
        self.applied_seq = 0
        self.clock_s = -math.inf  # the newest event time seen
        self.events = 0
        self._size = 0
        self.basket_counts = np.zeros(0, dtype=np.float64)  # by key
        self.buyers = np.zeros(0, dtype=np.int64)
        self.repeat_buyers = np.zeros(0, dtype=np.int64)
        # Decayed popularity, kept as sum(2 ** ((t - reference) / half-life)) and read at the
        # clock: an event adds one term, and nothing has to be decayed event by event.
        self._popularity = np.zeros(0, dtype=np.float64)
        self._reference_s: float | None = None

    # --- applying the log ---------------------------------------------------------------------

    def _grow(self, max_key: int) -> None:
        if max_key < self._size:
            return
        size = max(max_key + 1, 2 * self._size, 1024)
        for name in ("basket_counts", "buyers", "repeat_buyers", "_popularity"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self._size = size

    def apply(self, log) -> int:
        """Applies an EventLog's events with seq above applied_seq (ascending seq); returns
        how many."""
        seqs = np.asarray(log.seqs)
        fresh = np.flatnonzero(seqs > self.applied_seq)
        if not len(fresh):
            return 0
        start = int(fresh[0])
        keys = np.asarray(log.product_keys, dtype=np.int64)[start:]
        kinds = np.asarray(log.kinds)[start:]
        times = np.asarray(log.timestamps_s, dtype=np.float64)[start:]
        self._grow(int(keys.max()))
        basket_keys: list[int] = []
        basket_times: list[float] = []
        new_buyers: list[int] = []
        new_repeaters: list[int] = []
        pair_first: list[int] = []
        pair_second: list[int] = []
        users = self.users
        window = self.basket_window_s
        for user_id, key, kind, time_s in zip(
            log.user_ids[start:], keys.tolist(), kinds.tolist(), times.tolist(), strict=True
        ):
            history = users.get(user_id)
            if history is None:
                history = users[user_id] = UserHistory()
            recent = history.recent
            recent.pop(key, None)
            recent[key] = time_s
            if len(recent) > RECENT_ITEMS:
                del recent[next(iter(recent))]
            if kind != PURCHASE:
                continue
            if not 0 <= time_s - history.basket_start_s <= window:
                history.baskets += 1
                history.basket_start_s = time_s
                history.basket = []
            elif key in history.basket:
                continue  # the same product twice in one basket counts once
            entry = history.items.get(key)
            if entry is None:
                history.items[key] = [1, time_s]
                new_buyers.append(key)
            else:
                if entry[0] == 1:
                    new_repeaters.append(key)
                entry[0] += 1
                entry[1] = max(entry[1], time_s)
            history.last_purchase_s = max(history.last_purchase_s, time_s)
            basket_keys.append(key)
            basket_times.append(time_s)
            basket = history.basket
            if len(basket) < MAX_PAIR_BASKET_ITEMS:
                pair_first.extend([key] * len(basket))
                pair_second.extend(basket)
            basket.append(key)
        self.clock_s = max(self.clock_s, float(times.max()))
        if basket_keys:
            self._count(np.asarray(basket_keys), np.asarray(basket_times))
            np.add.at(self.buyers, np.asarray(new_buyers, dtype=np.int64), 1)
            np.add.at(self.repeat_buyers, np.asarray(new_repeaters, dtype=np.int64), 1)
        if pair_first:
            self.copurchase.add(np.asarray(pair_first), np.asarray(pair_second))
        self.applied_seq = int(seqs[-1])
        self.events += len(keys)
        return len(keys)

    def _count(self, keys: np.ndarray, times: np.ndarray) -> None:
        np.add.at(self.basket_counts, keys, 1.0)
        if self._reference_s is None:
            self._reference_s = float(times.min())
        exponents = (times - self._reference_s) / self.half_life_s
        if exponents.max() > 500:  # keep 2 ** exponent far from overflow: move the reference
            shift = float(exponents.max())
            self._popularity *= 2.0**-shift
            self._reference_s += shift * self.half_life_s
            exponents -= shift
        np.add.at(self._popularity, keys, np.exp2(exponents))

    # --- reading ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The length of the per-key arrays: above every product key seen (they grow by
        doubling, so it depends on how the log was applied; the arrays' contents do not)."""
        return self._size

    def popularity(self) -> np.ndarray:
        """float64 [size]: basket counts decayed to the clock by the half-life."""
        if self._reference_s is None:
            return self._popularity
        return self._popularity * np.exp2((self._reference_s - self.clock_s) / self.half_life_s)

    def user(self, user_id: str) -> UserHistory | None:
        return self.users.get(user_id)

    def copurchase_scores(self, key: int, shrink: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """The products bought with `key` and their cosine (baskets holding both over the
        geometric mean of the baskets holding each), times c / (c + shrink) for a pair seen in
        c baskets: (keys int64, scores float64)."""
        keys, counts = self.copurchase.row(key)
        if not len(keys) or key >= self._size:
            return keys, counts
        norms = np.sqrt(self.basket_counts[key] * self.basket_counts[keys])
        return keys, counts / np.maximum(norms, 1.0) * counts / (counts + shrink)


def event_log_of(
    user_ids: Sequence[str],
    product_keys: Sequence[int],
    timestamps_s: Sequence[float],
    kind: str = "purchase",
    first_seq: int = 1,
):
    """An EventLog of one kind of event (seqs from first_seq), for training and tests."""
    from ecomsearch.store import EventLog

    n = len(user_ids)
    return EventLog(
        seqs=np.arange(first_seq, first_seq + n, dtype=np.int64),
        user_ids=list(user_ids),
        product_ids=[""] * n,
        product_keys=np.asarray(product_keys, dtype=np.int64),
        kinds=np.full(n, contract.EVENT_KINDS.index(kind), dtype=np.int8),
        quantities=np.ones(n, dtype=np.int32),
        timestamps_s=np.asarray(timestamps_s, dtype=np.float64),
    )


# Events read from the store at a time when catching up.
EVENTS_PER_READ = 100_000


class EventCatchUp:
    """Applies the store's new events to `interactions`, in the calling thread, with a
    connection of that thread's own (a store connection is used by one thread)."""

    def __init__(self, store_url: str, interactions: Interactions) -> None:
        self.store_url = store_url
        self.interactions = interactions
        self._local = threading.local()

    def store(self):
        store = getattr(self._local, "store", None)
        if store is None:
            from ecomsearch.store import open_store

            store = self._local.store = open_store(self.store_url)
        return store

    def catch_up(self) -> int:
        store, applied = self.store(), 0
        while len(log := store.events(self.interactions.applied_seq, limit=EVENTS_PER_READ)):
            applied += self.interactions.apply(log)
        return applied
