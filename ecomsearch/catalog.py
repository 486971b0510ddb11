"""Product catalogs in JSON Lines: reading, validating, and the text the encoder sees."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecomsearch import contract

# The fields a product has; any other field of a record is kept in `attributes`.
KNOWN_FIELDS = frozenset(
    ["id", "title", "brand", "category", "category_path", "description", "price", "in_stock"]
)


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the line."""


@dataclass(frozen=True)
class Product:
    id: str
    title: str
    brand: str = ""
    category: str = ""
    description: str = ""
    price: float | None = None
    in_stock: bool = True  # catalogs without stock (the demo's) are in stock
    # The record's other fields, kept as they came (the catalog is their record of truth).
    attributes: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def category_path(self) -> tuple[str, ...]:
        """The category as its levels, broadest first ("Components > SSD" -> two levels)."""
        return split_category(self.category)

    def metadata(self) -> dict[str, Any]:
        """The compact record kept beside the index (display and filters)."""
        record: dict[str, Any] = {"id": self.id, "title": self.title}
        if self.brand:
            record["brand"] = self.brand
        if self.category:
            record["category"] = self.category
        if self.price is not None:
            record["price"] = self.price
        if not self.in_stock:
            record["in_stock"] = False
        return record


def split_category(category: str) -> tuple[str, ...]:
    """Category levels of a path written with ">" between them; blank levels dropped."""
    return tuple(part.strip() for part in category.split(">") if part.strip())


def join_category(levels: Any) -> str:
    return contract.CATEGORY_SEPARATOR.join(str(level).strip() for level in levels)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _category(record: dict[str, Any]) -> str:
    category = record.get("category")
    if category is None and isinstance(record.get("category_path"), list):
        category = join_category(record["category_path"])
    return str(category or "").strip()


def _price(value: Any, line_number: int) -> float | None:
    if value is None or value == "":
        return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise CatalogError(f"line {line_number}: price {value!r} is not a number") from None
    if not math.isfinite(price) or price < 0:
        raise CatalogError(f"line {line_number}: price {value!r} must be finite and >= 0")
    return price


def parse_product(record: Any, line_number: int) -> Product:
    if not isinstance(record, dict):
        raise CatalogError(f"line {line_number}: expected a JSON object")
    product_id, title = record.get("id"), record.get("title")
    if not isinstance(product_id, str) or not product_id.strip():
        raise CatalogError(f"line {line_number}: 'id' must be a non-empty string")
    if any(ch in product_id for ch in "\n\r\0"):
        raise CatalogError(f"line {line_number}: 'id' contains a control character")
    if not isinstance(title, str) or not title.strip():
        raise CatalogError(f"line {line_number}: 'title' must be a non-empty string")
    in_stock = record.get("in_stock", True)
    return Product(
        id=product_id,
        title=title.strip(),
        brand=str(record.get("brand") or "").strip(),
        category=_category(record),
        description=str(record.get("description") or "").strip(),
        price=_price(record.get("price"), line_number),
        in_stock=True if in_stock is None else bool(in_stock),
        attributes={k: v for k, v in record.items() if k not in KNOWN_FIELDS},
    )


def _optional_text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CatalogError(f"{name!r} must be a string or null, got {type(value).__name__}")
    return value.strip()


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def parse_product_write(record: Any) -> Product:
    """A product sent to the live catalog (an upsert), checked strictly: a wrong type is an
    error, not coerced. Unknown fields are fine (kept in `attributes`). Raises CatalogError.

    Catalog files go through the lenient `parse_product`: they are data someone exported, and
    a price written as "12.50" there is a price; a service writing one is a bug to report."""
    if not isinstance(record, dict):
        raise CatalogError("a product must be a JSON object")
    product_id = record.get("id")
    if not isinstance(product_id, str) or not product_id.strip():
        raise CatalogError("'id' must be a non-empty string")
    if len(product_id.encode("utf-8")) > contract.MAX_PRODUCT_ID_BYTES:
        raise CatalogError(f"'id' is longer than {contract.MAX_PRODUCT_ID_BYTES} bytes")
    title = record.get("title")
    if not isinstance(title, str) or not title.strip():
        raise CatalogError(f"product {product_id!r}: 'title' must be a non-empty string")
    if len(title.encode("utf-8")) > contract.MAX_TITLE_BYTES:
        raise CatalogError(
            f"product {product_id!r}: 'title' is longer than {contract.MAX_TITLE_BYTES} bytes"
        )
    try:
        size = len(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        # NUL is valid JSON and valid Python, but PostgreSQL stores no NUL in text or JSONB:
        # refused here for every store, so a write means the same whichever store serves it.
        if _has_nul(record):
            raise CatalogError("text must not contain NUL characters (\\u0000)")
        brand, description = _optional_text(record, "brand"), _optional_text(record, "description")
        category = record.get("category")
        path = record.get("category_path")
        if category is not None and not isinstance(category, str):
            raise CatalogError("'category' must be a string or null")
        if path is not None and (
            not isinstance(path, list) or not all(isinstance(level, str) for level in path)
        ):
            raise CatalogError("'category_path' must be a list of strings or null")
        price = record.get("price")
        if price is not None and (isinstance(price, bool) or not isinstance(price, int | float)):
            raise CatalogError(f"'price' must be a number or null, got {type(price).__name__}")
        if price is not None and (not math.isfinite(price) or price < 0):
            raise CatalogError(f"'price' must be finite and >= 0, got {price!r}")
        in_stock = record.get("in_stock", True)
        if in_stock is not None and not isinstance(in_stock, bool):
            raise CatalogError(f"'in_stock' must be true, false or null, got {in_stock!r}")
    except CatalogError as e:
        raise CatalogError(f"product {product_id!r}: {e}") from None
    except (TypeError, ValueError) as e:  # not JSON-serialisable: NaN is fine, objects are not
        raise CatalogError(f"product {product_id!r}: not a JSON object ({e})") from None
    if size > contract.MAX_PRODUCT_JSON_BYTES:
        raise CatalogError(
            f"product {product_id!r} is {size} bytes of JSON; the maximum is "
            f"{contract.MAX_PRODUCT_JSON_BYTES}"
        )
    return Product(
        id=product_id,
        title=title.strip(),
        brand=brand,
        category=category.strip() if category else join_category(path or []),
        description=description,
        price=None if price is None else float(price),
        in_stock=True if in_stock is None else in_stock,
        attributes={k: v for k, v in record.items() if k not in KNOWN_FIELDS},
    )


def parse_product_writes(records: list[Any]) -> list[Product]:
    """A batch of writes: every product valid and every id once, or CatalogError (naming the
    first bad product's position) and nothing is written."""
    if not records:
        raise CatalogError("no products given")
    if len(records) > contract.MAX_PRODUCTS_PER_WRITE:
        raise CatalogError(
            f"{len(records)} products in one write; "
            f"the maximum is {contract.MAX_PRODUCTS_PER_WRITE}"
        )
    products, seen = [], set()
    for position, record in enumerate(records):
        try:
            product = parse_product_write(record)
        except CatalogError as e:
            raise CatalogError(f"product {position}: {e}") from None
        if product.id in seen:
            raise CatalogError(f"product {position}: id {product.id!r} appears twice in the batch")
        seen.add(product.id)
        products.append(product)
    return products


def iter_records(path: Path | str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON) of each non-blank line of a JSON Lines file (.gz ok)."""
    path = Path(path)
    with _open_text(path) as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}: line {line_number}: invalid JSON ({e.msg})") from None


def iter_catalog(path: Path | str) -> Iterator[Product]:
    for line_number, record in iter_records(path):
        yield parse_product(record, line_number)


def read_catalog(path: Path | str) -> list[Product]:
    """All products of a JSON Lines file (optionally gzipped); ids must be unique."""
    products = list(iter_catalog(path))
    if not products:
        raise CatalogError(f"{path}: the catalog is empty")
    seen: set[str] = set()
    for product in products:
        if product.id in seen:
            raise CatalogError(f"{path}: product id {product.id!r} appears more than once")
        seen.add(product.id)
    return products


def product_text(product: Product) -> str:
    """The text embedded for a product: title first (it matters most and survives truncation),
    then the category leaf and the description or brand."""
    parts = [product.title]
    if product.category:
        parts.append(product.category.rsplit(">", 1)[-1].strip())
    if product.description:
        parts.append(product.description)
    elif product.brand:
        parts.append(product.brand)
    return " | ".join(parts)
