"""The built-in `local` model honours `n` when streaming, as it does for a JSON answer."""

from __future__ import annotations

EXPECTED = "Hello from the built-in local model. You said: Hi there"


def test_streaming_local_model_sends_n_choices_and_bills_them_all(client):
    chunks = list(client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi there"}], n=3, stream=True,
        stream_options={"include_usage": True},
    ))
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: EXPECTED, 1: EXPECTED, 2: EXPECTED}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    whole = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi there"}], n=3)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
