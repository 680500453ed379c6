"""What the Anthropic lane does for the Anthropic front door: the client's body forwarded as it
is (native passthrough), and thinking brought back as reasoning deltas the door can render."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace as NS

from gateway.providers.anthropic import (
    StreamMapper,
    native_request,
    request_for,
    to_anthropic,
    to_openai_completion,
)
from gateway.routing import LaneSpec
from gateway.types import ChatRequest, Outcome


def lane() -> LaneSpec:
    return LaneSpec(id=1, route_model="claude", position=0, provider="anthropic", upstream_model="claude-up",
                    base_url="", api_key_env="", context_window=200_000, price_input=Decimal("3"),
                    price_output=Decimal("15"), price_cached_input=Decimal("0.3"))


BODY = {"model": "claude", "max_tokens": 2048, "stream": True, "top_k": 4,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}


def test_a_native_body_is_forwarded_unchanged_but_for_the_lanes_model():
    req = ChatRequest(model="claude", messages=[{"role": "user", "content": "hi"}], max_tokens=2048,
                      native=("anthropic", BODY))
    assert native_request(lane(), req) == {
        "model": "claude-up", "max_tokens": 2048, "messages": BODY["messages"],
        "extra_body": {"top_k": 4, "thinking": BODY["thinking"], "system": BODY["system"]}}
    assert request_for(lane(), req) == native_request(lane(), req)


def test_a_request_from_another_protocol_is_translated():
    req = ChatRequest(model="claude", messages=[{"role": "user", "content": "hi"}], native=("openai", {"x": 1}))
    assert native_request(lane(), req) is None
    assert request_for(lane(), req) == to_anthropic(lane(), req)


def test_thinking_deltas_and_signatures_become_reasoning_deltas():
    outcome = Outcome()
    mapper = StreamMapper("claude-up", outcome)
    thinking = mapper.feed(NS(type="content_block_delta", index=0, delta=NS(type="thinking_delta", thinking="hm")))
    assert outcome.first_token_at is not None  # thinking is output: a stream cut now is billed for it
    signed = mapper.feed(NS(type="content_block_delta", index=0, delta=NS(type="signature_delta", signature="sig")))
    assert thinking["choices"][0]["delta"] == {"reasoning_content": "hm"}
    assert signed["choices"][0]["delta"] == {"reasoning_signature": "sig"}


def test_a_whole_answers_thinking_block_becomes_reasoning_content():
    message = NS(id="msg_1", model="claude-up", stop_reason="end_turn",
                 usage=NS(input_tokens=3, output_tokens=2, cache_read_input_tokens=0, cache_creation_input_tokens=0),
                 content=[NS(type="thinking", thinking="hm", signature="sig"), NS(type="text", text="ok")])
    reply = to_openai_completion(message, created=1)["choices"][0]["message"]
    assert (reply["content"], reply["reasoning_content"], reply["reasoning_signature"]) == ("ok", "hm", "sig")


def test_sampling_parameters_reach_an_anthropic_lane_from_the_openai_door(client, fake_anthropic, fakes_reset):
    """This SDK version takes temperature and top_p only in the body (extra_body), not as arguments."""
    client.chat.completions.create(model="claude-sonnet", temperature=0.3, top_p=0.8,
                                   messages=[{"role": "user", "content": "hi"}])
    sent = fake_anthropic.last_request.body
    assert (sent["temperature"], sent["top_p"]) == (0.3, 0.8)
