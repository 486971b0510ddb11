"""Makes the tiny Online Retail test fixture in this directory from the shared data set.

    python tests/data/online_retail/make_sample.py [SHARED_DIR]

SHARED_DIR holds `transactions.csv.gz` and `catalog.jsonl.gz` (see its README.md); it defaults
to `../shared/data/online_retail` next to the project. Writes `transactions_sample.csv` and
`catalog_sample.jsonl` here. Deterministic: the same input gives the same bytes.

The subset, all from the raw rows dated PERIOD_START <= InvoiceDate < PERIOD_END:

1. the CUSTOMERS customers with the most distinct invoices that are not cancellations (ties:
   smaller CustomerID first);
2. the CODES StockCodes in the most of those customers' rows (ties: smaller code first);
3. every raw row of those customers with one of those codes, cancellations and all;
4. plus, for each kind of row the purchase filter must drop (a cancellation, no CustomerID,
   POST, DOT, a gift_ voucher, a zero price on a customer's ordinary invoice, a negative
   quantity on an invoice that is not a cancellation), the first raw row of that kind in the
   period when step 3 left none of it.

Rows keep the source file's order and text. The catalog sample is the lines of
`catalog.jsonl.gz` whose id is a StockCode of the sample, in the catalog's order.

Stdlib only, and deliberately independent of ecomsearch: the fixture must not be shaped by the
code it tests.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parents[3] / "shared" / "data" / "online_retail"

PERIOD_START = "2011-10-01"
PERIOD_END = "2011-11-09"  # exclusive; the shared file ends here too
CUSTOMERS = 40
CODES = 150

TRANSACTIONS_OUT = HERE / "transactions_sample.csv"
CATALOG_OUT = HERE / "catalog_sample.jsonl"


def _quantity(row: dict[str, str]) -> float:
    return float(row["Quantity"])


def _price(row: dict[str, str]) -> float:
    return float(row["UnitPrice"])


# The kinds of raw row a purchase is not, each by its own defining trait.
FILTER_KINDS: dict[str, Callable[[dict[str, str]], bool]] = {
    "cancellation": lambda r: r["InvoiceNo"].startswith("C"),
    "no customer": lambda r: not r["CustomerID"].strip(),
    "POST": lambda r: r["StockCode"] == "POST",
    "DOT": lambda r: r["StockCode"] == "DOT",
    "gift voucher": lambda r: r["StockCode"].startswith("gift_"),
    # on a customer's ordinary invoice, so only the price excludes it
    "zero price": lambda r: (
        _price(r) == 0
        and bool(r["CustomerID"].strip())
        and _quantity(r) > 0
        and not r["InvoiceNo"].startswith("C")
    ),
    "negative quantity, not a cancellation": lambda r: (
        _quantity(r) < 0 and not r["InvoiceNo"].startswith("C")
    ),
}


def in_period(row: dict[str, str]) -> bool:
    return PERIOD_START <= row["InvoiceDate"][:10] < PERIOD_END


def select(rows: list[dict[str, str]]) -> list[int]:
    """Indices (into rows, ascending) of the sample's rows."""
    period = [i for i, row in enumerate(rows) if in_period(row)]
    invoices: dict[str, set[str]] = defaultdict(set)
    for i in period:
        row = rows[i]
        if row["CustomerID"].strip() and not row["InvoiceNo"].startswith("C"):
            invoices[row["CustomerID"]].add(row["InvoiceNo"])
    ranked = sorted(invoices, key=lambda customer: (-len(invoices[customer]), customer))
    customers = set(ranked[:CUSTOMERS])
    theirs = [i for i in period if rows[i]["CustomerID"] in customers]
    counts = Counter(rows[i]["StockCode"] for i in theirs)
    codes = {code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CODES]}
    chosen = {i for i in theirs if rows[i]["StockCode"] in codes}
    for kind, is_kind in FILTER_KINDS.items():
        if any(is_kind(rows[i]) for i in chosen):
            continue
        extra = next((i for i in period if is_kind(rows[i])), None)
        if extra is None:
            raise SystemExit(f"no {kind} row in {PERIOD_START}..{PERIOD_END}")
        chosen.add(extra)
    return sorted(chosen)


def main(shared: Path) -> None:
    with gzip.open(shared / "transactions.csv.gz", "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    sample = [rows[i] for i in select(rows)]
    with open(TRANSACTIONS_OUT, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sample)
    codes = {row["StockCode"] for row in sample}
    lines = []
    with gzip.open(shared / "catalog.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip() and json.loads(line)["id"] in codes:
                lines.append(line if line.endswith("\n") else line + "\n")
    CATALOG_OUT.write_text("".join(lines), encoding="utf-8")
    print(
        f"{TRANSACTIONS_OUT.name}: {len(sample)} rows, {len(codes)} StockCodes; "
        f"{CATALOG_OUT.name}: {len(lines)} products"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SHARED)
