"""Product catalogs in JSON Lines: reading, validating, and the text the encoder sees."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    def metadata(self) -> dict[str, Any]:
        """The compact record kept beside the index (display and, later, filters)."""
        record: dict[str, Any] = {"id": self.id, "title": self.title}
        if self.brand:
            record["brand"] = self.brand
        if self.category:
            record["category"] = self.category
        if self.price is not None:
            record["price"] = self.price
        return record


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _category(record: dict[str, Any]) -> str:
    category = record.get("category")
    if category is None and isinstance(record.get("category_path"), list):
        category = " > ".join(str(part) for part in record["category_path"])
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
    return Product(
        id=product_id,
        title=title.strip(),
        brand=str(record.get("brand") or "").strip(),
        category=_category(record),
        description=str(record.get("description") or "").strip(),
        price=_price(record.get("price"), line_number),
    )


def iter_catalog(path: Path | str) -> Iterator[Product]:
    path = Path(path)
    with _open_text(path) as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}: line {line_number}: invalid JSON ({e.msg})") from None
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
