"""The JSON Schemas copied into tests/schemas are valid schemas that say where they came from."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
FILES = sorted(SCHEMAS.glob("*.schema.json"))


def test_the_schemas_folder_holds_the_files_the_tests_name():
    names = {path.name.removesuffix(".schema.json") for path in FILES}
    assert {
        "openai.CreateChatCompletionResponse", "openai.CreateChatCompletionStreamResponse",
        "openai.ErrorResponse", "openai.ListModelsResponse",
        "openai.Response", "openai.ResponseStreamEvent",
        "anthropic.CreateMessageParams", "anthropic.Message", "anthropic.MessageStreamEvent",
        "anthropic.ErrorResponse", "anthropic.ListModelsResponse",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_each_schema_is_a_valid_2020_12_schema_naming_its_source_commit(path):
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    vendor = path.name.split(".")[0]
    source = {"openai": "openai-openapi@", "anthropic": "anthropic-stainless-via-tryAGI@"}[vendor]
    assert schema["$id"].startswith(f"urn:conformance:{source}")
    assert '"$recursiveRef":' not in path.read_text()  # ignored by 2020-12: would accept anything


def test_a_responses_stream_event_is_told_apart_by_its_type():
    validator = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "openai.ResponseStreamEvent.schema.json").read_text())
    )
    delta = {
        "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
        "content_index": 0, "delta": "Hi", "sequence_number": 3, "logprobs": [],
    }
    assert validator.is_valid(delta)
    assert not validator.is_valid({**delta, "type": "response.no_such_event"})
    assert not validator.is_valid({key: v for key, v in delta.items() if key != "delta"})
