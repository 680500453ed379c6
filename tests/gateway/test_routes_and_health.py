"""Routes load from a file (all or nothing); health, readiness and operator status."""

from __future__ import annotations

import json
import urllib.request

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from gateway.models import Lane, ModelRoute

GOOD = """
routes:
  - model: file-model
    lanes:
      - provider: openai-compatible
        upstream_model: m1
        base_url: http://127.0.0.1:9/v1
        api_key_env: SOME_KEY
        context_window: 8000
        prices: {input: "0.10", output: "0.20", cached_input: "0.05"}
      - provider: local
        upstream_model: local
"""


def write(tmp_path, text: str):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.django_db
def test_load_routes_upserts_idempotently(tmp_path):
    call_command("load_routes", write(tmp_path, GOOD))
    call_command("load_routes", write(tmp_path, GOOD))
    route = ModelRoute.objects.get(model="file-model")
    lanes = list(route.lanes.order_by("position"))
    assert [(lane.provider, lane.upstream_model) for lane in lanes] == [("openai-compatible", "m1"), ("local", "local")]
    assert str(lanes[0].price_input) == "0.100000" and lanes[0].api_key_env == "SOME_KEY"


@pytest.mark.django_db
def test_load_routes_accepts_json(tmp_path):
    document = {"routes": [{"model": "json-model", "lanes": [{"provider": "local", "upstream_model": "local"}]}]}
    call_command("load_routes", write(tmp_path, json.dumps(document)))
    assert ModelRoute.objects.filter(model="json-model").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "mutation, message",
    [
        (("provider: local", "provider: locale"), "line 11: routes[0].lanes[1].provider: must be one of"),
        (("context_window: 8000", "context_window: -1"), "line 5: routes[0].lanes[0].context_window"),
        (("api_key_env: SOME_KEY", "api_key_env: sk-real-secret"), "routes[0].lanes[0].api_key_env"),
        (("base_url: http://127.0.0.1:9/v1", "base_url: not-a-url"), "routes[0].lanes[0].base_url"),
        (('input: "0.10"', 'input: "ten cents"'), "line 10: routes[0].lanes[0].prices.input"),
        (("upstream_model: m1", "upstream_modle: m1"), "routes[0].lanes[0].upstream_modle: unknown field"),
    ],
)
def test_a_bad_routes_file_is_refused_whole(tmp_path, mutation, message):
    call_command("load_routes", write(tmp_path, GOOD))
    before = list(Lane.objects.values_list("route__model", "position", "upstream_model", "price_input"))
    bad = GOOD.replace(*mutation) + "\n  - model: another\n    lanes: [{provider: local, upstream_model: local}]\n"
    with pytest.raises(CommandError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        call_command("load_routes", write(tmp_path, bad))
    assert "nothing was changed" in str(caught.value)
    assert list(Lane.objects.values_list("route__model", "position", "upstream_model", "price_input")) == before
    assert not ModelRoute.objects.filter(model="another").exists()


@pytest.mark.django_db
def test_a_file_that_is_not_yaml_names_the_line(tmp_path):
    with pytest.raises(CommandError, match="line 3: not valid YAML"):
        call_command("load_routes", write(tmp_path, "routes:\n  - model: [x\n    lanes: ]\n"))


def get(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def test_health_touches_nothing_and_ready_checks_both_stores(server):
    status, headers, body = get(f"{server.url}/health")
    assert status == 200 and body == {"status": "ok"} and headers["x-request-id"]
    status, headers, body = get(f"{server.url}/ready")
    assert status == 200 and body["checks"] == {"postgres": "ok", "redis": "ok"}
    assert headers["x-request-id"]


def test_ready_is_503_when_redis_is_unreachable(routes):
    from tests.conftest import Server

    broken = Server({"REDIS_URL": "redis://127.0.0.1:1/0"})
    try:
        status, headers, body = get(f"{broken.url}/ready")
        assert status == 503 and body["checks"]["redis"].startswith("error") and headers["retry-after"]
    finally:
        broken.stop()


def test_status_is_for_operators_only(server, committed_db):
    status, _, body = get(f"{server.url}/status")
    assert status == 403 and body["error"]["code"] == "forbidden"
    from django.contrib.auth.models import User
    from django.test import Client

    admin = User.objects.filter(username="statusadmin").first() or User.objects.create_superuser("statusadmin", "s@b.c", "pw-123456789")
    browser = Client()
    browser.force_login(admin)
    from billing.writer import DEAD_LETTER
    from llm_platform.redis import get_redis

    get_redis().xadd(DEAD_LETTER, {"row": "{}", "error": "test"})
    body = browser.get("/status").json()
    assert body["usage"]["dead_letters"] == get_redis().xlen(DEAD_LETTER) >= 1
    assert body["usage"]["spooled_files"] == 0 and isinstance(body["usage"]["in_stream"], int)
    lanes = {(lane["model"], lane["position"]): lane for lane in body["lanes"]}
    assert lanes[("local", 0)]["reachable"] and lanes[("local", 0)]["configured"]
    assert lanes[("unconfigured", 0)]["configured"] is False
    assert "sk-fake" not in json.dumps(body)


@pytest.mark.django_db
def test_each_lane_keeps_its_own_policy_across_table_reloads(tmp_path):
    """Policies once came from a cache keyed by id(options): reloads let lanes swap them."""
    from gateway.lane_policy import policy_for
    from gateway.routing import load_table

    call_command("load_routes", write(tmp_path, """
routes:
  - model: strict-lane
    lanes:
      - {provider: local, upstream_model: a, retry: {max_attempts: 1}, breaker: {min_calls: 1000000}}
  - model: loose-lane
    lanes:
      - {provider: local, upstream_model: b, retry: {max_attempts: 5}, breaker: {min_calls: 2}}
"""))
    for _ in range(200):
        table = load_table()
        strict, loose = policy_for(table["strict-lane"].lanes[0]), policy_for(table["loose-lane"].lanes[0])
        assert (strict.retry.max_attempts, strict.breaker.min_calls) == (1, 1_000_000)
        assert (loose.retry.max_attempts, loose.breaker.min_calls) == (5, 2)
