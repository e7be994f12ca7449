"""docs/openapi.yaml against the app, in-process: the document is valid OpenAPI, it lists
exactly the routes the app serves, and its examples match their schemas. (The fuzzing of a
real server against it: ``e2e/test_openapi.py``.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from support import ROOT  # noqa: E402

SPEC = ROOT / "docs" / "openapi.yaml"


def test_spec_is_valid_openapi():
    spec = schemathesis.openapi.from_path(SPEC)
    spec.validate()  # raises on a document that is not valid OpenAPI 3.0
    labels = {result.ok().label for result in spec.get_all_operations()}
    assert labels == {"GET /", "GET /healthz", "GET /readyz", "GET /metrics", "POST /notify",
                      "GET /rooms", "GET /rooms/{room}", "GET /ws", "GET /rooms/{room}/history",
                      "POST /disconnect", "POST /unsubscribe"}


# Served, but not the API: the browser client file and the development console (HTML pages).
NOT_API_ENDPOINTS = ("static", "console.")


def test_spec_documents_every_route(app):
    """The spec lists exactly the routes and methods the app serves (HEAD and OPTIONS are
    the framework's, for every route; /notify is served below Flask, by wsserver.notify)."""
    from wsserver.notify import METHODS, PATH

    served = {f"{method} {PATH}" for method in METHODS if method != "OPTIONS"}
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(NOT_API_ENDPOINTS):
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # werkzeug's <x:name>
            served.add(f"{method} {path}")
    operations = schemathesis.openapi.from_path(SPEC).get_all_operations()
    documented = {result.ok().label for result in operations}
    assert documented == served


def test_spec_examples_match_their_schemas():
    """The examples in the spec are valid against the schemas they illustrate."""
    import jsonschema_rs
    import yaml

    raw = yaml.safe_load(Path(SPEC).read_text())
    components = raw["components"]

    def validator(schema: dict):
        # OpenAPI 3.0 schemas are JSON Schema here except `nullable`, which the examples
        # do not rely on; resolve "#/components/..." refs against the document.
        return jsonschema_rs.validator_for({**schema, "components": components})

    checked = 0
    for path, item in raw["paths"].items():
        for method, op in item.items():
            bodies = [op.get("requestBody", {}).get("content", {})]
            bodies += [r.get("content", {}) for r in op.get("responses", {}).values()]
            for content in bodies:
                for media in content.values():
                    examples = [e["value"] for e in media.get("examples", {}).values()]
                    if "example" in media:
                        examples.append(media["example"])
                    for example in examples:
                        errors = list(validator(media["schema"]).iter_errors(example))
                        assert not errors, f"{method.upper()} {path}: {example!r}: {errors[0]}"
                        checked += 1
    assert checked >= 10
