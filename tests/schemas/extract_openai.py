"""Extract one component of OpenAI's OpenAPI file as a self-contained JSON Schema (2020-12).

Not a test and not run by one: the tests read the extracted files in this folder. This is how
``openai.Response`` and ``openai.ResponseStreamEvent`` were made, and it reproduces the other
``openai.*.schema.json`` files here byte for byte from the same OpenAPI file:

    python tests/schemas/extract_openai.py ../shared/specs/openai-openapi.yaml Response \
        > tests/schemas/openai.Response.schema.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"  # github.com/openai/openai-openapi
PREFIX = "#/components/schemas/"
HOISTED = ("title", "description", "default", "deprecated")  # onto the anyOf-null wrapper


def clean(node: Any, home: str, notes: set[str]) -> Any:
    """Refs into ``$defs``, ``nullable`` into anyOf-null, discriminator/x-* dropped."""
    if isinstance(node, list):
        return [clean(item, home, notes) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in ("discriminator", "$recursiveAnchor"):
            continue
        if key == "$recursiveRef" and value == "#":  # draft 2019-09; 2020-12 ignores it
            out["$ref"] = home
            notes.add("recursive")
        elif key == "$ref":
            out[key] = "#/$defs/" + value.removeprefix(PREFIX)
        elif key in ("properties", "patternProperties", "$defs"):
            out[key] = {name: clean(sub, home, notes) for name, sub in value.items()}
        else:
            out[key] = clean(value, home, notes)
    if out.pop("nullable", None) is True:
        wrapper = {key: out.pop(key) for key in HOISTED if key in out}
        return {**wrapper, "anyOf": [out, {"type": "null"}]}
    return out


def referenced(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.add(value.removeprefix(PREFIX))
            elif not key.startswith("x-"):
                referenced(value, found)
    elif isinstance(node, list):
        for item in node:
            referenced(item, found)


def extract(components: dict[str, Any], name: str) -> dict[str, Any]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            found: set[str] = set()
            referenced(components[current], found)
            todo += sorted(found - seen)
    notes: set[str] = set()
    root = clean(components[name], "#", notes)
    defs = {n: clean(components[n], f"#/$defs/{n}", notes) for n in sorted(seen - {name})}
    comment = (
        f"Extracted from github.com/openai/openai-openapi openapi.yaml @ {COMMIT}; component refs"
        " bundled into $defs; OpenAPI `nullable` converted to anyOf-null; discriminator/x-* dropped."
    )
    if "recursive" in notes:
        comment += " Draft 2019-09 `$recursiveRef: #` turned into a `$ref` to its component."
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:conformance:openai-openapi@{COMMIT}:{name}",
        "title": name,
        "$comment": comment,
        **root,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def main(openapi_path: str, name: str) -> None:
    with open(openapi_path) as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    json.dump(extract(spec["components"]["schemas"], name), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
