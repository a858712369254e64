"""Generates the MedMOTraining CRD from the API models: `python -m medmo_operator.crd [--check]`.

Pydantic's JSON schema is turned into a structural OpenAPI v3 schema: references are inlined,
`Optional[X]` becomes X (absent means unset), literals become enums, int-or-string quantities are
marked as such, and the CEL rules declared on the models are kept. The result is checked in under
crds/ and a test fails when it drifts from the models.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from medmo_operator import api

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{api.PLURAL}.{api.GROUP}.yaml"

DEFAULT_MAX_STRING = 4096
DEFAULT_MAX_ITEMS = 64
_DROPPED_KEYS = {"title", "$defs", "additionalProperties", "discriminator"}

ROOT_VALIDATIONS = [
    api.cel(
        f"size(self.metadata.name) <= {api.MAX_RUN_NAME}",
        f"metadata.name must be at most {api.MAX_RUN_NAME} characters (child Jobs and pods are named after it)",
    ),
]

SPEC_TRANSITION_VALIDATIONS = [
    api.cel(
        "!has(oldSelf.status) || !has(oldSelf.status.stages) || oldSelf.status.stages.all(st, "
        "st.phase == 'Pending' || !oldSelf.spec.stages.exists(o, o.name == st.name) || "
        "self.spec.stages.exists(n, n.name == st.name && "
        "oldSelf.spec.stages.exists(o, o.name == st.name && o == n)))",
        "stages that have started or finished cannot be changed or removed; edit only stages that are still Pending",
    ),
]


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, with its CEL rules."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.get("$defs", {})
    return _convert(raw, definitions)


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = definitions[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, definitions)
    if "anyOf" in node:
        return _convert_any_of(node, definitions)
    if "allOf" in node and len(node["allOf"]) == 1:
        merged = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        return _convert(merged, definitions)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
        node.pop("const")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "required" and not value:
            continue
        if key == "properties":
            out["properties"] = {name: _convert(child, definitions) for name, child in value.items()}
        elif key == "items":
            out["items"] = _convert(value, definitions)
        elif key == "default" and value is None:
            continue
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020 gives the bound itself; OpenAPI v3.0 a flag on minimum/maximum.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = copy.deepcopy(value)
    if node.get("type") == "object" and "properties" not in node:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, definitions)
        elif not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    if out.get("format") == "date-time":
        out["type"] = "string"
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    _bound(out)
    return out


def _bound(schema: dict[str, Any]) -> None:
    """Caps what the models leave unbounded, so the API server can cost the CEL rules."""
    kind = schema.get("type")
    if kind == "string" and "enum" not in schema and "format" not in schema:
        schema.setdefault("maxLength", DEFAULT_MAX_STRING)
    elif kind == "array":
        schema.setdefault("maxItems", DEFAULT_MAX_ITEMS)
    elif kind == "object" and "additionalProperties" in schema:
        schema.setdefault("maxProperties", DEFAULT_MAX_ITEMS)


def _convert_any_of(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """`X | None` becomes X; `int | str` becomes an int-or-string quantity."""
    options = [option for option in node["anyOf"] if option.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    types = {option.get("type") for option in options}
    if types == {"integer", "string"}:
        out = {k: v for k, v in rest.items() if k not in _DROPPED_KEYS and k != "default" or k == "default" and v is not None}
        out["x-kubernetes-int-or-string"] = True
        return out
    if len(options) != 1:
        raise ValueError(f"cannot express a union of {types} in a structural schema: {node}")
    return _convert({**options[0], **rest}, definitions)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    spec_schema = openapi_schema(api.MedMOTrainingSpec)
    status_schema = openapi_schema(api.MedMOTrainingStatus)
    status_schema["description"] = " ".join(api.MedMOTrainingStatus.__doc__.split())
    # kopf keeps its handler progress under status.kopf; structural pruning must not drop it.
    status_schema.setdefault("properties", {})["kopf"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "description": "Handler bookkeeping of the kopf operator framework.",
    }
    status_schema.pop("additionalProperties", None)
    status_schema.pop("x-kubernetes-preserve-unknown-fields", None)
    root = {
        "type": "object",
        "description": "A MedMO training run: the whole recipe as one resource.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": ROOT_VALIDATIONS + SPEC_TRANSITION_VALIDATIONS,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `python -m medmo_operator.crd` from operator/medmo_operator/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in CRD differs")
    parser.add_argument("--out", type=Path, default=CRD_PATH)
    args = parser.parse_args(argv)
    text = render_crd()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date; run `python -m medmo_operator.crd`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
