"""The usage row as a typed record: refused when it does not fit, kept whole from the chat
service through the Redis stream to the ledger table."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from django.conf import settings

from billing import recorder
from billing.ledger import InvalidRow, UsageRow
from billing.models import UsageRecord
from billing.writer import DEAD_LETTER, drain_all
from llm_platform.redis import get_redis
from tests.support.rows import fields


def test_a_row_with_an_unknown_field_is_refused():
    with pytest.raises(TypeError, match="prompt_version"):
        UsageRow(**fields(prompt_version="v3"))
    with pytest.raises(InvalidRow, match="unknown field.*prompt_version"):
        UsageRow.from_json(orjson.dumps(fields(prompt_version="v3"), default=str))


def test_a_row_missing_a_field_is_refused():
    incomplete = fields()
    del incomplete["feature"]
    with pytest.raises(TypeError, match="feature"):
        UsageRow(**incomplete)
    with pytest.raises(InvalidRow, match="missing field.*feature"):
        UsageRow.from_json(orjson.dumps(incomplete, default=str))


def test_a_row_with_a_value_of_the_wrong_type_is_refused_where_it_is_read_back():
    assert UsageRow.from_json(UsageRow(**fields()).to_json()).cost_usd == Decimal("0.150425783")
    for name, value, reason in [("cost_usd", 0.15, "cost_usd: expected a decimal string, got float"),
                                ("cost_usd", "NaN", "cost_usd: not a finite amount"),
                                ("tenant_id", "1", "tenant_id: expected an integer, got str"),
                                ("stream", 1, "stream: expected a boolean, got int")]:
        with pytest.raises(InvalidRow, match=reason):
            UsageRow.from_json(orjson.dumps(fields(**{name: value}), default=str))


def test_a_stream_entry_that_is_not_a_row_is_dead_lettered_with_its_reason_and_logged(tenants, caplog):
    tenant, key, _ = tenants.make()
    good = fields(tenant_id=tenant.pk, api_key_id=key.pk)
    unknown = fields(tenant_id=tenant.pk, api_key_id=key.pk, prompt_version="v3")
    missing = fields(tenant_id=tenant.pk)
    del missing["http_status"]
    stream, client = settings.GATEWAY["USAGE_STREAM"], get_redis()
    payloads = [orjson.dumps(unknown, default=str), orjson.dumps(missing, default=str), b"{not json",
                UsageRow(**good).to_json()]
    entries = [client.xadd(stream, {"row": payload}) for payload in payloads]
    dead_before = client.xrange(DEAD_LETTER)[-1][0] if client.xlen(DEAD_LETTER) else b"0-0"
    with caplog.at_level(logging.ERROR, logger="billing.writer"):
        drain_all("test-writer")
    mine = set(entries)  # the stream may hold other tests' entries: look at ours only
    dead = [(entry_id, fields_) for entry_id, fields_ in client.xrange(DEAD_LETTER, min=b"(" + dead_before)
            if fields_.get(b"entry") in mine]
    try:
        assert UsageRecord.objects.filter(request_id=good["request_id"]).exists()  # the rest of the batch
        assert not UsageRecord.objects.filter(request_id__in=[unknown["request_id"], missing["request_id"]]).exists()
        set_aside = {f[b"entry"]: f for _, f in dead}
        assert set(set_aside) == set(entries[:3])
        assert set_aside[entries[0]][b"row"] == payloads[0]  # kept as it came, for an operator to replay
        assert b"unknown field(s): prompt_version" in set_aside[entries[0]][b"error"]
        assert b"missing field(s): http_status" in set_aside[entries[1]][b"error"]
        assert b"not JSON" in set_aside[entries[2]][b"error"]
        logged = {r.entry: r for r in caplog.records
                  if r.levelno == logging.ERROR and r.getMessage() == "usage row set aside" and r.entry.encode() in mine}
        assert set(logged) == {entry.decode() for entry in entries[:3]}
        assert [logged[entry.decode()].request_id for entry in entries[:3]] == [
            unknown["request_id"], missing["request_id"], None]
        assert all(client.xrange(stream, min=entry, max=entry) == [] for entry in entries)  # not retried forever
    finally:
        if dead:
            client.xdel(DEAD_LETTER, *(entry_id for entry_id, _ in dead))


def test_a_row_recorded_comes_out_of_the_ledger_with_every_field(tenants):
    """UsageRow -> recorder -> Redis stream -> writer -> UsageRecord, field for field."""
    tenant, key, _ = tenants.make()
    row = UsageRow(**fields(tenant_id=tenant.pk, api_key_id=key.pk))
    asyncio.run(recorder.record(row))
    drain_all("test-writer")
    stored = UsageRecord.objects.get(request_id=row.request_id)
    for field in dataclasses.fields(UsageRow):
        expected = getattr(row, field.name)
        if field.name == "created_at":
            expected = datetime.fromtimestamp(expected, tz=UTC)
        assert getattr(stored, field.name) == expected, field.name
    assert stored.cost_usd == Decimal("0.150425783")
    stored.delete()


def test_a_row_holding_nul_characters_is_stored_not_set_aside(tenants):
    tenant, key, _ = tenants.make()
    row = UsageRow(**fields(tenant_id=tenant.pk, api_key_id=key.pk, prompt=[{"role": "user", "content": "a\x00b"}],
                            completion="c\x00d", end_user="u\x00"))
    asyncio.run(recorder.record(row))
    drain_all("test-writer")
    stored = UsageRecord.objects.get(request_id=row.request_id)
    assert stored.prompt == [{"role": "user", "content": "a\ufffdb"}]
    assert stored.completion == "c\ufffdd" and stored.end_user == "u\ufffd"
