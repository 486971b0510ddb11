"""The command line as a user meets it: --version, and every option's help saying its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import ecomsearch
from ecomsearch import cli


def subcommands(
    parser: argparse.ArgumentParser | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand by its name, nested ones too ("catalog upsert")."""
    parser = parser or cli.build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found[name] = subparser
                found.update({f"{name} {n}": p for n, p in subcommands(subparser).items()})
    return found


def test_version_is_the_packages(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"ecomsearch {ecomsearch.__version__}"
    assert version("ecomsearch") == ecomsearch.__version__


@pytest.mark.parametrize("columns", ["40", "200"])
@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(
    name: str, columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A narrow terminal is where argparse's default wrapping cut long default paths in two
    # (a CI checkout under a longer directory failed this way).
    monkeypatch.setenv("COLUMNS", columns)
    parser = subcommands()[name]
    assert isinstance(parser.formatter_class, type)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            default = (
                " ".join(map(str, action.default))
                if isinstance(action.default, list)
                else str(action.default)
            )
            shown = f"(default: {default})"
            assert shown in text or f"(default: {action.default})" in text, (
                f"{name} {action.option_strings[0]}: help does not show {shown}"
            )


def test_help_renders_from_the_command_line() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ecomsearch.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    text = " ".join(completed.stdout.split())
    assert "(default: 8001)" in text and "--model-config-name" in text


def test_nested_subcommands_are_found() -> None:
    assert {
        "catalog",
        "catalog upsert",
        "catalog delete",
        "search",
        "recommend",
        "similar",
        "events record",
    } <= set(subcommands())


# --- Commands that talk to a server, against a fake client ------------------------------------


class FakeClient:
    """Stands in for ecomsearch.client.SearchClient; records what the commands send."""

    instances: list[FakeClient] = []  # noqa: RUF012
    fail_on_write: int | None = None  # the n-th write (from 0) raises

    def __init__(self, url: str, timeout_s: float = 2.0, write_key: str | None = None) -> None:
        self.url, self.timeout_s, self.write_key = url, timeout_s, write_key
        self.searches: list[dict] = []
        self.writes: list[tuple[str, list, float]] = []
        self.seq = 100
        FakeClient.instances.append(self)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def search(self, query, k, user_id=None, explain=False, **filters):
        from ecomsearch.client import Hit

        self.searches.append({"query": query, "k": k, **filters})
        if user_id is not None:
            self.searches[-1]["user_id"] = user_id
        explanation = None
        if explain:
            self.searches[-1]["explain"] = True
            contributions = {"cosine": 0.5, "bm25_title": 0.25, "in_both_lists": -0.04}
            contributions.update({f"f{i}": 0.01 for i in range(4)})
            explanation = {
                "score": 0.91,
                "base_value": 0.1,
                "contributions": contributions,
                "feature_values": {name: 1.0 for name in contributions},
                "personalisation": 0.06,
            }
        return [
            Hit(
                "sku-1", 0.91, "Wireless mouse", price=19.5, in_stock=True, explanation=explanation
            ),
            Hit("sku-2", 0.5, "Mouse pad", price=None, in_stock=False),
        ]

    def _write(self, kind: str, values: list, timeout_s: float):
        from ecomsearch.client import BadRequestError, WriteAck

        if FakeClient.fail_on_write == len(self.writes):
            raise BadRequestError("product 0: 'price' must be a number (INVALID_ARGUMENT)")
        self.writes.append((kind, list(values), timeout_s))
        self.seq += len(values)
        return WriteAck(self.seq, len(values))

    def upsert_products(self, products, timeout_s):
        return self._write("upsert", products, timeout_s)

    def recommend(self, user_id, k, recent_product_ids=(), **filters):
        self.searches.append(
            {"user_id": user_id, "k": k, "recent_product_ids": list(recent_product_ids), **filters}
        )
        return self.search("", k)[:1]

    def similar(self, product_id, k, **filters):
        self.searches.append({"product_id": product_id, "k": k, **filters})
        return self.search("", k)

    def record_events(self, events, timeout_s):
        from ecomsearch.client import BadRequestError, EventsAck

        if FakeClient.fail_on_write == len(self.writes):
            raise BadRequestError("nothing was written: no live product 'x' (INVALID_ARGUMENT)")
        self.writes.append(("events", list(events), timeout_s))
        self.seq += len(events)
        return EventsAck(self.seq, len(events))

    def delete_products(self, ids, timeout_s):
        return self._write("delete", ids, timeout_s)


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    import ecomsearch.client

    FakeClient.instances = []
    FakeClient.fail_on_write = None
    monkeypatch.setattr(ecomsearch.client, "SearchClient", FakeClient)
    return FakeClient


def test_search_asks_for_a_rerank_depth_only_when_given_one(fake_client) -> None:
    assert cli.main(["search", "mouse", "--rerank-depth", "16"]) == 0
    (client,) = fake_client.instances
    assert client.searches[0]["rerank_depth"] == 16


def test_search_sends_the_filters_and_shows_price_and_stock(fake_client, capsys) -> None:
    code = cli.main(
        ["search", "mouse", "-k", "2", "--brand", "Logi", "--max-price", "50", "--in-stock"]
    )

    assert code == 0
    (client,) = fake_client.instances
    assert client.searches == [
        {
            "query": "mouse",
            "k": 2,
            "rerank_depth": None,  # the server's default
            "category": None,
            "brand": "Logi",
            "min_price": None,
            "max_price": 50.0,
            "in_stock": True,
        }
    ]
    first, second = capsys.readouterr().out.splitlines()
    assert "19.50" in first and "in stock" in first and "Wireless mouse" in first
    assert " - " in second and "out of stock" in second


def test_search_explain_shows_the_parts_of_the_score_adding_up(fake_client, capsys) -> None:
    assert cli.main(["search", "mouse", "--explain"]) == 0
    (client,) = fake_client.instances
    assert client.searches[0]["explain"] is True
    lines = capsys.readouterr().out.splitlines()
    assert "Wireless mouse" in lines[0] and "Mouse pad" in lines[2]
    parts = lines[1].split(", ")
    assert parts[0].strip() == "base +0.100"
    assert parts[1] == "cosine=1 +0.500"
    # Five named, the other two summed, then the shopper's term: 0.1 + 0.75 + 0.06 = 0.91.
    assert parts[-2:] == ["2 others +0.020", "personalisation +0.060"]
    assert sum(float(p.rsplit(" ", 1)[1]) for p in parts) == pytest.approx(0.91, abs=1e-3)


def test_search_with_a_user_id_is_personalised(fake_client) -> None:
    assert cli.main(["search", "mouse", "--user-id", "shopper-1"]) == 0
    (client,) = fake_client.instances
    assert client.searches[0]["user_id"] == "shopper-1"


def test_main_stops_on_sigterm_and_gives_the_handler_back(
    fake_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a command runs, SIGTERM unwinds it like Ctrl-C; afterwards the caller's own
    handler is back (left installed, a late SIGTERM raised SystemExit in interpreter teardown)."""
    import signal

    def callers_handler(signum, frame) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        during: list[object] = []
        search = fake_client.search

        def search_noting_the_handler(self, *args, **kwargs):
            during.append(signal.getsignal(signal.SIGTERM))
            return search(self, *args, **kwargs)

        monkeypatch.setattr(fake_client, "search", search_noting_the_handler)
        assert cli.main(["search", "mouse"]) == 0
        assert during == [cli._exit_on_sigterm]
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_search_json_carries_price_and_stock(fake_client, capsys) -> None:
    import json

    assert cli.main(["search", "mouse", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["price"] == 19.5 and hits[1]["price"] is None
    assert [hit["in_stock"] for hit in hits] == [True, False]


def test_recommend_and_similar_send_what_they_were_given(fake_client, capsys) -> None:
    assert cli.main(["recommend", "shopper-1", "-k", "3", "--recent", "a", "b", "--in-stock"]) == 0
    assert cli.main(["similar", "sku-1", "--max-price", "20"]) == 0
    recommend_client, similar_client = fake_client.instances
    no_filters = {"category": None, "brand": None, "min_price": None, "max_price": None}
    assert recommend_client.searches[0] == {
        "user_id": "shopper-1",
        "k": 3,
        "recent_product_ids": ["a", "b"],
        **no_filters,
        "in_stock": True,
    }
    assert similar_client.searches[0] == {
        "product_id": "sku-1",
        "k": 10,
        **{**no_filters, "max_price": 20.0},
        "in_stock": False,
    }
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "Wireless mouse" in lines[0]


def test_events_record_sends_one_write_of_one_event_per_product(fake_client, capsys) -> None:
    from ecomsearch.client import ShopperEvent

    argv = ["events", "record", "shopper-1", "purchase", "sku-1", "sku-2", "--quantity", "2"]
    assert cli.main([*argv, "--timestamp-s", "1000.5", "--timeout-s", "4"]) == 0
    (client,) = fake_client.instances
    assert client.writes == [
        (
            "events",
            [
                ShopperEvent("shopper-1", "sku-1", "purchase", 2, 1000.5),
                ShopperEvent("shopper-1", "sku-2", "purchase", 2, 1000.5),
            ],
            4.0,
        )
    ]
    assert "2 events recorded" in capsys.readouterr().out
    fake_client.fail_on_write = 0  # the next command's client refuses its first write
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.startswith("error: nothing was written")


def write_changes(path, count: int, **extra) -> None:
    import json

    lines = [json.dumps({"id": f"sku-{i}", "title": f"Part {i}", **extra}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n\n")


def test_catalog_upsert_sends_the_file_in_writes_of_batch_size(fake_client, tmp_path, capsys):
    changes = tmp_path / "changes.jsonl"
    write_changes(changes, 5, price=9.5)

    code = cli.main(
        ["catalog", "upsert", "--file", str(changes), "--batch-size", "2", "--url", "h:1"]
    )

    assert code == 0
    (client,) = fake_client.instances
    assert client.url == "h:1"
    assert [len(values) for _, values, _ in client.writes] == [2, 2, 1]
    assert client.writes[0][1][0] == {"id": "sku-0", "title": "Part 0", "price": 9.5}
    assert client.writes[0][2] == 30.0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "products 1-2: 2 written, sequence number 102",
        "products 3-4: 2 written, sequence number 104",
        "products 5-5: 1 written, sequence number 105",
    ]
    assert out[3] == "5 products written in 3 writes; the catalog is at sequence number 105"


def test_catalog_upsert_says_what_was_written_when_a_write_fails(fake_client, tmp_path, capsys):
    changes = tmp_path / "changes.jsonl"
    write_changes(changes, 5)
    fake_client.fail_on_write = 1

    assert cli.main(["catalog", "upsert", "--file", str(changes), "--batch-size", "2"]) == 1

    err = capsys.readouterr().err
    assert "error: products 3-4: product 0: 'price'" in err
    assert "products 1-2 were written (sequence number 102); nothing from product 3 on" in err


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (['{"id": "a", "title": "A"}', "{oops"], "line 2: invalid JSON"),
        (['{"id": "a", "title": "A", "price": "12"}'], "line 1: product 'a': 'price'"),
        (['{"id": "a", "title": "A"}', '{"id": "a", "title": "B"}'], "already on line 1"),
        (["", "  "], "no products"),
    ],
)
def test_catalog_upsert_checks_the_whole_file_before_sending(
    fake_client, tmp_path, caplog, lines, fragment
) -> None:
    changes = tmp_path / "changes.jsonl"
    changes.write_text("\n".join(lines) + "\n")

    assert cli.main(["catalog", "upsert", "--file", str(changes)]) == 1

    assert fragment in caplog.text
    assert all(client.writes == [] for client in fake_client.instances)


def test_catalog_upsert_reads_gzip(fake_client, tmp_path) -> None:
    import gzip

    changes = tmp_path / "changes.jsonl.gz"
    with gzip.open(changes, "wt", encoding="utf-8") as stream:
        stream.write('{"id": "a", "title": "A"}\n')
    assert cli.main(["catalog", "upsert", "--file", str(changes)]) == 0
    (client,) = fake_client.instances
    assert client.writes[0][1] == [{"id": "a", "title": "A"}]


@pytest.mark.parametrize("size", ["0", "1001", "x"])
def test_catalog_upsert_batch_size_is_bounded(size: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["catalog", "upsert", "--file", "x.jsonl", "--batch-size", size])
    assert exited.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_catalog_delete_sends_the_ids_in_one_write(fake_client, capsys) -> None:
    assert cli.main(["catalog", "delete", "sku-1", "sku-2", "--timeout-s", "5"]) == 0
    (client,) = fake_client.instances
    assert client.writes == [("delete", ["sku-1", "sku-2"], 5.0)]
    out = capsys.readouterr().out
    assert "2 of 2 products deleted" in out and "sequence number 102" in out


def test_catalog_delete_reports_a_refused_write(fake_client, capsys) -> None:
    fake_client.fail_on_write = 0
    assert cli.main(["catalog", "delete", "sku-1"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_catalog_writes_send_the_write_key_from_a_file_or_the_environment(
    fake_client, tmp_path, monkeypatch
) -> None:
    key_file = tmp_path / "write.key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("ECOMSEARCH_WRITE_KEY", "from-env")
    assert cli.main(["catalog", "delete", "a", "--url", "h:1"]) == 0
    assert (
        cli.main(["catalog", "delete", "a", "--url", "h:1", "--write-key-file", str(key_file)]) == 0
    )
    monkeypatch.delenv("ECOMSEARCH_WRITE_KEY")
    assert cli.main(["catalog", "delete", "a", "--url", "h:1"]) == 0
    assert [c.write_key for c in fake_client.instances] == ["from-env", "from-file", None]


@pytest.mark.parametrize(
    ("address", "given", "expected"),
    [
        ("127.0.0.1", None, None),  # a developer's machine: writes open
        ("127.0.0.1", "k", "k"),
        ("0.0.0.0", "k", "k"),
        ("0.0.0.0", None, "random"),  # on a network without a key: nobody can write
    ],
)
def test_serve_closes_writes_on_a_network_address_without_a_key(
    tmp_path, monkeypatch, address, given, expected
) -> None:
    monkeypatch.delenv("ECOMSEARCH_WRITE_KEY", raising=False)
    key_file = None
    if given is not None:
        key_file = tmp_path / "write.key"
        key_file.write_text(given)
    args = cli.build_parser().parse_args(
        ["serve", "--address", address] + (["--write-key-file", str(key_file)] if key_file else [])
    )
    key = cli._serving_write_key(args)
    if expected == "random":
        assert key is not None and len(key) >= 24
        assert key != cli._serving_write_key(args)  # not guessable from one start to the next
    else:
        assert key == expected
