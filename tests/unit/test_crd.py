"""The generated CRD: in sync with the models, structural, and carrying its CEL rules."""

from __future__ import annotations

from typing import Any

import yaml

from medmo_operator import crd


def test_checked_in_crd_matches_the_models():
    assert crd.CRD_PATH.read_text() == crd.render_crd(), "crds/ is stale: run `python -m medmo_operator.crd`"


def _walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _root_schema() -> dict[str, Any]:
    return yaml.safe_load(crd.CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural():
    forbidden = {"anyOf", "oneOf", "allOf", "$ref", "nullable", "const", "title"}
    for path, node in _walk(_root_schema()):
        assert not forbidden & node.keys(), f"{path} uses {forbidden & node.keys()}"
        if node.get("x-kubernetes-int-or-string"):
            continue
        assert "type" in node, f"{path} has no type"
        if node["type"] == "object" and path != ".metadata":
            declared = "properties" in node or "additionalProperties" in node
            assert declared or node.get("x-kubernetes-preserve-unknown-fields") is True, f"{path} is an open object"


def test_only_kopf_state_preserves_unknown_fields():
    open_objects = [path for path, node in _walk(_root_schema()) if node.get("x-kubernetes-preserve-unknown-fields")]

    assert open_objects == [".status.kopf"]


def test_crd_names_columns_and_subresources():
    obj = yaml.safe_load(crd.CRD_PATH.read_text())
    version = obj["spec"]["versions"][0]

    assert obj["spec"]["names"]["shortNames"] == ["mmt"]
    assert "medmo" in obj["spec"]["names"]["categories"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Step", "Age"]


def test_cel_rules_cover_what_the_schema_cannot_say():
    messages = [rule["message"] for _, node in _walk(_root_schema()) for rule in node.get("x-kubernetes-validations", [])]
    text = "\n".join(messages)

    for expected in ("unique", "rollout and reward", "first stage cannot be of type eval", "storage.uri must start", "cannot be changed"):
        assert expected in text, f"no CEL rule says {expected!r}"


def test_every_field_is_documented():
    undocumented = [
        path
        for path, node in _walk(_root_schema()["properties"]["spec"])
        if path and not path.endswith("[]") and not path.endswith("}") and not node.get("description")
    ]
    assert undocumented == []
