"""Purchase histories from a transactions file in the UCI Online Retail layout.

Columns: InvoiceNo, StockCode, Description, Quantity, InvoiceDate (`YYYY-MM-DD HH:MM:SS`),
UnitPrice, CustomerID (written as a float, `17850.0`), Country. A purchase is a row with a
customer, an invoice that is not a cancellation (`C...`), a positive quantity and price, and a
StockCode that names a product rather than a fee, a postage line or an adjustment.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# StockCodes that are not products: postage, discounts, manual adjustments, fees, samples.
NON_PRODUCT_CODES = frozenset(
    {"POST", "D", "M", "DOT", "BANK CHARGES", "AMAZONFEE", "C2", "CRUK", "PADS", "S", "B", "m"}
)
NON_PRODUCT_PREFIXES = ("gift_", "DCGS")
REQUIRED_COLUMNS = ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID")


class TransactionsError(ValueError):
    """The transactions file cannot be read as purchases (missing columns, bad values)."""


def is_product_code(code: str) -> bool:
    return code not in NON_PRODUCT_CODES and not code.startswith(NON_PRODUCT_PREFIXES)


# InvoiceDate layouts besides ISO 8601: the UCI spreadsheet's, as CSV exports of it write it.
# Month first only: accepting day-first too would read 3/4 one way and 13/4 the other.
OTHER_TIME_FORMATS = ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S")


def parse_time_s(text: str) -> float:
    """Seconds since the epoch of an InvoiceDate, read as UTC (the file has no zone; one zone
    for every row is all the order and the gaps need). ISO 8601 (`2011-12-09 12:50:00`, or a
    date alone), else the spreadsheet's month-first `12/9/2011 12:50`; ValueError otherwise."""
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        for layout in OTHER_TIME_FORMATS:
            try:
                moment = datetime.strptime(text, layout)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"{text!r} is not a date and time (YYYY-MM-DD HH:MM:SS)") from None
    return moment.replace(tzinfo=timezone.utc).timestamp()


def customer_id(text: str) -> str:
    """`17850.0` -> `17850`: the id as the shop would send it."""
    text = text.strip()
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Purchases:
    """Purchase rows, column-wise, in time order (ties keep file order)."""

    invoices: list[str]
    customers: list[str]
    products: list[str]
    quantities: np.ndarray  # int64
    timestamps_s: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.products)

    def take(self, mask: np.ndarray) -> Purchases:
        rows = np.flatnonzero(mask)
        return Purchases(
            [self.invoices[i] for i in rows],
            [self.customers[i] for i in rows],
            [self.products[i] for i in rows],
            self.quantities[rows],
            self.timestamps_s[rows],
        )

    def before(self, cutoff_s: float) -> Purchases:
        return self.take(self.timestamps_s < cutoff_s)

    def at_or_after(self, cutoff_s: float) -> Purchases:
        return self.take(self.timestamps_s >= cutoff_s)

    def restricted_to(self, products: set[str]) -> Purchases:
        return self.take(np.array([p in products for p in self.products], dtype=bool))


@dataclass(frozen=True)
class Basket:
    """One invoice: a customer's purchases at one time."""

    invoice: str
    customer: str
    timestamp_s: float
    products: tuple[str, ...]  # distinct, in file order
    quantities: tuple[int, ...]  # summed per product


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_purchases(path: Path) -> Purchases:
    """The purchases of a transactions file, sorted by time."""
    invoices, customers, products, quantities, times = [], [], [], [], []
    with _open_text(Path(path)) as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TransactionsError(f"{path}: no column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            customer, invoice, code = row["CustomerID"], row["InvoiceNo"], row["StockCode"]
            if not customer or not customer.strip() or invoice.startswith("C"):
                continue
            if not is_product_code(code):
                continue
            try:
                quantity, price = float(row["Quantity"]), float(row["UnitPrice"])
                if quantity <= 0 or price <= 0:
                    continue
                timestamp_s = parse_time_s(row["InvoiceDate"])
            except ValueError as e:
                raise TransactionsError(f"{path}:{line}: {e}") from None
            invoices.append(invoice)
            customers.append(customer_id(customer))
            products.append(code)
            quantities.append(int(quantity))
            times.append(timestamp_s)
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    return Purchases(
        [invoices[i] for i in order],
        [customers[i] for i in order],
        [products[i] for i in order],
        np.asarray(quantities, dtype=np.int64)[order],
        np.asarray(times, dtype=np.float64)[order],
    )


def baskets(purchases: Purchases) -> Iterator[Basket]:
    """The invoices of `purchases`, in time order (an invoice's rows share its time)."""
    grouped: dict[str, dict] = {}
    for invoice, customer, product, quantity, timestamp_s in zip(
        purchases.invoices,
        purchases.customers,
        purchases.products,
        purchases.quantities.tolist(),
        purchases.timestamps_s.tolist(),
        strict=True,
    ):
        entry = grouped.get(invoice)
        if entry is None:
            entry = grouped[invoice] = {"customer": customer, "time": timestamp_s, "items": {}}
        items = entry["items"]
        items[product] = items.get(product, 0) + quantity
    ordered = sorted(grouped.items(), key=lambda item: item[1]["time"])  # stable: file order
    for invoice, entry in ordered:
        yield Basket(
            invoice,
            entry["customer"],
            entry["time"],
            tuple(entry["items"]),
            tuple(entry["items"].values()),
        )


def evaluation_baskets(purchases: Purchases, cutoff_s: float) -> list[Basket]:
    """The evaluation's baskets: invoices at or after the cutoff by customers with at least one
    purchase before that invoice's time (before the cutoff, or earlier in the test period)."""
    first_purchase: dict[str, float] = {}
    for customer, timestamp_s in zip(
        purchases.customers, purchases.timestamps_s.tolist(), strict=True
    ):
        first_purchase.setdefault(customer, timestamp_s)
    return [
        basket
        for basket in baskets(purchases.at_or_after(cutoff_s))
        if first_purchase[basket.customer] < basket.timestamp_s
    ]
