"""Token counts are exact and need no network (tokenizer files shipped and hash-checked)."""

from gateway.tokens import count_messages, count_text, encoding, encoding_name_for


def test_known_strings_encode_exactly():
    assert encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert count_text("hello world", "gpt-4o-mini") == 2


def test_model_families_pick_their_encoding():
    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("gpt-4-turbo") == "cl100k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("claude-sonnet-4-5") == "o200k_base"


def test_chat_accounting_adds_per_message_overhead():
    messages = [{"role": "user", "content": "hello world"}]
    assert count_messages(messages, "gpt-4o") == 3 + 3 + 2
