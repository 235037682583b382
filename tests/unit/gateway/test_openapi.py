"""The gateway's OpenAPI document: valid OpenAPI 3.1 whatever the registry holds, RPC and
stream endpoints and HTTP services as the gateway routes them, only what the caller may call,
untrusted formats sanitized."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.exceptions import PointerToNowhere

from meshd.errors import MeshError
from meshd.gateway import openapi
from meshd_sdk.schema import describe

ERROR_CODES = {"400", "401", "403", "404", "408", "413", "429", "500", "503"}
FIXED = {"/health", "/openapi.json", "/rpc", "/events/{topic}"}


@dataclass
class HelloRequest:
    name: str


@dataclass
class HelloResponse:
    msg: str


@dataclass
class Nested:
    inner: HelloRequest
    count: int = 0


@dataclass
class Scalars:
    name: str
    count: int
    ratio: float = 1.0
    loud: bool = False


@dataclass
class Empty:
    pass


def ep(name: str, request: Any = None, response: Any = None, stream: bool = False
       ) -> dict[str, Any]:
    return {"name": name, "request": request, "response": response, "metadata": {},
            "stream": stream}


def inst(service: str, endpoints: list[dict[str, Any]], version: str = "1.0.0",
         id: str = "", metadata: dict[str, str] | None = None) -> dict[str, Any]:
    return {"id": id or f"{service}-{version}", "service": service, "version": version,
            "node": "n1", "namespace": "default", "metadata": metadata or {},
            "endpoints": endpoints}


def check(doc: dict[str, Any]) -> None:
    """Valid OpenAPI 3.1 and plain JSON (no NaN, no non-string keys). openapi-spec-validator
    does not look into request bodies, so their schemas are checked as components too."""
    probe = json.loads(json.dumps(doc, allow_nan=False))
    assert probe == doc
    probe["components"]["schemas"].update(
        (f"Body{i}", media["schema"]) for i, (_, _, op) in enumerate(operations(probe))
        for media in op.get("requestBody", {}).get("content", {}).values())
    validate(probe, cls=OpenAPIV31SpecValidator)


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items()
            for method, op in item.items() if method in ("get", "post", "put", "patch",
                                                         "delete")]


def nodes(schema: Any, depth: int = 1) -> tuple[int, int]:
    """(schema nodes, deepest level) of a sanitized schema."""
    if not isinstance(schema, dict):
        return 1, depth
    subs = [*schema.get("properties", {}).values(), *schema.get("anyOf", []),
            *(schema[k] for k in ("items", "additionalProperties") if k in schema)]
    count, deepest = 1, depth
    for sub in subs:
        c, d = nodes(sub, depth + 1)
        count, deepest = count + c, max(deepest, d)
    return count, deepest


def greeter_services() -> dict[str, list[dict[str, Any]]]:
    return {
        "greeter": [
            inst("greeter", [ep("Greeter.Hello", {"type": "string"}, {"type": "string"}),
                             ep("Greeter.Old", describe(Empty), describe(HelloResponse))],
                 version="0.9.0"),
            inst("greeter", [ep("Greeter.Hello", describe(HelloRequest),
                                describe(HelloResponse)),
                             ep("Greeter.Watch", describe(HelloRequest),
                                describe(HelloResponse), stream=True)],
                 version="1.0.0"),
        ],
        "web": [inst("web", [ep("Web.Page", describe(HelloRequest))],
                     metadata={"http": "127.0.0.1:8080"})],
    }


def test_greeter_stream_and_http_service_document():
    doc = openapi.build(greeter_services(), server_url="https://api.example.com")
    check(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "meshd API gateway"
    assert doc["info"]["version"] == openapi.VERSION == metadata.version("meshd")
    assert "Micro" in doc["info"]["description"]
    assert doc["servers"] == [{"url": "https://api.example.com"}]
    assert list(doc["paths"]) == ["/health", "/openapi.json", "/rpc", "/events/{topic}",
                                  "/greeter/Greeter.Hello", "/greeter/Greeter.Old",
                                  "/greeter/Greeter.Watch", "/web/{path}"]

    # the newest instance gives Greeter.Hello's formats; the old one still adds Greeter.Old
    hello = doc["paths"]["/greeter/Greeter.Hello"]
    assert set(hello) == {"get", "post"}
    post = hello["post"]
    assert post["operationId"] == "greeter.Greeter.Hello"
    assert post["tags"] == ["greeter"]
    assert post["summary"]
    # a well-formed format passes sanitizing unchanged
    assert post["requestBody"] == {"required": True, "content": {"application/json": {
        "schema": describe(HelloRequest)}}}
    assert describe(HelloRequest)["properties"] == {"name": {"type": "string"}}
    response = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert response == describe(HelloResponse)
    assert (response["title"], response["required"]) == ("HelloResponse", ["msg"])
    assert hello["get"]["parameters"] == [
        {"name": "name", "in": "query", "required": True, "schema": {"type": "string"}}]
    assert hello["get"]["operationId"] == "greeter.Greeter.Hello.get"

    # an empty dataclass is an all-scalar object: GET without parameters
    old = doc["paths"]["/greeter/Greeter.Old"]
    assert set(old) == {"get", "post"} and "parameters" not in old["get"]

    watch = doc["paths"]["/greeter/Greeter.Watch"]
    assert set(watch) == {"get", "post"}
    for op in watch.values():
        ok = op["responses"]["200"]
        assert ok["content"] == {"text/event-stream": {"schema": {"type": "string"}}}
        assert "WebSocket" in ok["description"]
    assert watch["post"]["requestBody"]["content"]["application/json"]["schema"][
        "title"] == "HelloRequest"

    # an HTTP service: only the proxied path, its RPC endpoints are not routable by path
    assert not any(p.startswith("/web/Web.") for p in doc["paths"])
    web = doc["paths"]["/web/{path}"]
    assert set(web) == {"get", "post", "put", "patch", "delete"}
    for op in web.values():
        assert op["x-meshd-http-service"] is True
        assert op["parameters"] == [{"name": "path", "in": "path", "required": True,
                                     "description": "The path under /web/.",
                                     "schema": {"type": "string"}}]
        assert op["responses"]["default"] == {"description": "the service's own response"}

    # fixed routes
    rpc = doc["paths"]["/rpc"]["post"]["requestBody"]
    assert rpc["required"] is True
    body = rpc["content"]["application/json"]["schema"]
    assert body["required"] == ["service", "endpoint"]
    assert body["properties"]["timeout"]["exclusiveMinimum"] == 0
    assert body["properties"]["timeout"]["maximum"] == 3600
    events = doc["paths"]["/events/{topic}"]["post"]
    assert events["parameters"][0]["name"] == "topic"
    assert events["responses"]["202"]["content"]["application/json"]["schema"][
        "required"] == ["id"]
    health = doc["paths"]["/health"]["get"]["responses"]["200"]
    assert set(health["content"]["application/json"]["schema"]["properties"]) == \
        {"status", "node"}

    # every operation documents the gateway's errors, shaped as MeshError.to_dict()
    for _, _, op in operations(doc):
        errors = {code: r for code, r in op["responses"].items() if code in ERROR_CODES}
        assert set(errors) == ERROR_CODES
        for r in errors.values():
            assert r["content"] == {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}
    error = doc["components"]["schemas"]["Error"]
    assert set(error["properties"]) == set(MeshError(400, "x").to_dict())
    assert error["properties"]["status"]["type"] == "integer"
    assert error["required"] == ["status", "detail"]
    assert doc["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "cookie": {"type": "apiKey", "in": "cookie", "name": "meshd_token"}}
    assert doc["security"] == [{}, {"bearer": []}, {"cookie": []}]


def test_no_servers_without_a_url_and_title_and_version_given():
    doc = openapi.build({}, title="t", version="9")
    check(doc)
    assert "servers" not in doc
    assert doc["info"]["title"] == "t" and doc["info"]["version"] == "9"
    assert set(doc["paths"]) == FIXED


def test_get_query_parameters_only_for_all_scalar_objects():
    doc = openapi.build({"s": [inst("s", [
        ep("S.Scalars", describe(Scalars)),
        ep("S.Nested", describe(Nested)),
        ep("S.List", describe(list[str])),
        ep("S.Map", describe(dict[str, int])),
        ep("S.Optional", {"anyOf": [describe(HelloRequest), {"type": "null"}]}),
        ep("S.OptionalField", {"type": "object", "properties": {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}]}}, "required": []}),
        ep("S.Any", None),
        ep("S.Text", describe(str)),
        ep("S.Undeclared", {"type": "object", "properties": {"a": {"type": "string"}},
                            "required": ["a", "b"]}),
        ep("S.Wide", {"type": "object", "properties": {
            f"f{i}": {"type": "integer"} for i in range(openapi.MAX_QUERY_FIELDS + 1)}}),
    ])]})
    check(doc)
    with_get = {p.rsplit("/", 1)[1] for p, item in doc["paths"].items() if "get" in item
                and p.startswith("/s/")}
    assert with_get == {"S.Scalars"}
    params = doc["paths"]["/s/S.Scalars"]["get"]["parameters"]
    assert [(p["name"], p["in"], p["required"], p["schema"]["type"]) for p in params] == [
        ("name", "query", True, "string"), ("count", "query", True, "integer"),
        ("ratio", "query", False, "number"), ("loud", "query", False, "boolean")]
    # "any" is not a required body; a real format is
    assert doc["paths"]["/s/S.Any"]["post"]["requestBody"]["required"] is False
    assert doc["paths"]["/s/S.Any"]["post"]["requestBody"]["content"][
        "application/json"]["schema"] == {}
    assert doc["paths"]["/s/S.Text"]["post"]["requestBody"]["required"] is True


def test_allowed_leaves_out_what_the_caller_may_not_call():
    asked: list[tuple[str, str]] = []

    def allowed(service: str, endpoint: str) -> bool:
        asked.append((service, endpoint))
        return endpoint not in ("Greeter.Watch", "http")

    doc = openapi.build(greeter_services(), allowed=allowed)
    check(doc)
    assert "/greeter/Greeter.Hello" in doc["paths"]
    assert "/greeter/Greeter.Watch" not in doc["paths"]
    assert "/web/{path}" not in doc["paths"]
    assert ("web", "http") in asked and ("greeter", "Greeter.Watch") in asked
    assert set(openapi.build(greeter_services(), allowed=lambda s, e: False)["paths"]) == FIXED


def deep(levels: int, wrap) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        node = wrap(node)
    return node


def test_hostile_formats_are_sanitized_and_the_document_stays_valid():
    huge = {"type": "object",
            "properties": {f"p{i}": {"type": "string", "title": "x"} for i in range(50_000)},
            "required": [f"p{i}" for i in range(50_000)]}
    hostile = {
        "Deep.Properties": deep(1000, lambda n: {"type": "object", "properties": {"a": n}}),
        "Deep.Items": deep(1000, lambda n: {"type": "array", "items": n}),
        "Deep.AnyOf": deep(1000, lambda n: {"anyOf": [n, {"type": "null"}]}),
        "Huge.Dict": huge,
        "Wrong.Types": {"type": 5, "properties": [1, 2], "required": "name", "items": "x",
                        "anyOf": {}, "enum": "a", "title": 7, "format": ["x"],
                        "additionalProperties": "no"},
        "Bad.Type": {"type": ["string", "nope"], "title": "t" * 10_000},
        "Bad.Refs": {"$ref": "#/components/schemas/Nope", "type": "object", "allOf": [{}],
                 "$defs": {"a": {}}, "properties": {
                     "$ref": {"$ref": "http://evil.example/x", "type": "string"},
                     "x": {"$dynamicRef": "#meta"}}},
        "Bad.Keys": {"type": "object", "properties": {1: {"type": "string"}, None: {},
                                                  "ok": {"type": "integer"}},
                 "required": [1, "ok", None, "ok", ["x"]]},
        "Bad.Values": {"type": "integer", "enum": [1, True, float("nan"), 2**70, "\ud800", 1],
                   "default": float("inf")},
        "Bad.Defaults": {"type": "object", "properties": {
            "bad": {"type": "integer", "default": "text"},
            "good": {"type": "integer", "default": 3},
            "notinenum": {"type": "string", "enum": ["a"], "default": "b"},
            "formatted": {"type": "string", "format": "date", "default": "not a date"},
            "structured": {"type": "array", "default": [1]}}},
        "Not.AMap": ["type", "string"],
    }
    services = {"bad": [inst("bad", [ep(name, fmt, fmt) for name, fmt in hostile.items()])]}
    doc = openapi.build(services)
    check(doc)

    def body(name: str) -> Any:
        return doc["paths"][f"/bad/{name}"]["post"]["requestBody"]["content"][
            "application/json"]["schema"]

    for name in ("Deep.Properties", "Deep.Items", "Deep.AnyOf"):
        assert nodes(body(name))[1] <= openapi.MAX_DEPTH
    assert nodes(body("Deep.Properties"))[1] == openapi.MAX_DEPTH
    assert nodes(body("Huge.Dict"))[0] <= openapi.MAX_NODES
    assert len(json.dumps(body("Huge.Dict"))) < 100_000
    assert body("Wrong.Types") == {}
    assert body("Bad.Type") == {"title": "t" * openapi.MAX_TEXT}
    refs = body("Bad.Refs")
    assert refs == {"type": "object", "properties": {"$ref": {"type": "string"}, "x": {}}}
    assert body("Bad.Keys") == {"type": "object", "properties": {"ok": {"type": "integer"}},
                            "required": ["ok"]}
    assert body("Bad.Values") == {"type": "integer", "enum": [1, True]}
    assert body("Bad.Defaults")["properties"] == {
        "bad": {"type": "integer"}, "good": {"type": "integer", "default": 3},
        "notinenum": {"type": "string", "enum": ["a"]},
        "formatted": {"type": "string", "format": "date"}, "structured": {"type": "array"}}
    assert body("Not.AMap") == {}
    assert doc["paths"]["/bad/Not.AMap"]["post"]["requestBody"]["required"] is False


def test_the_validator_rejects_what_sanitizing_removes():
    # the checks above mean something: raw, these formats make an invalid document
    doc = openapi.build({"s": [inst("s", [ep("S.X", {"type": "object"})])]})
    check(doc)
    for raw in ({"type": "nope"}, {"type": ["string", "string"]}, {"anyOf": []},
                {"type": "integer", "default": "text"}, {"required": [1]},
                {"type": "string", "format": "date", "default": "x"},
                {"$ref": "#/components/schemas/Nope"}):
        for part in ("requestBody", "responses"):
            broken = copy.deepcopy(doc)
            post = broken["paths"]["/s/S.X"]["post"]
            media = post["requestBody"] if part == "requestBody" else post["responses"]["200"]
            media["content"]["application/json"]["schema"] = raw
            with pytest.raises((OpenAPIValidationError, PointerToNowhere)):
                check(broken)
        fixed = copy.deepcopy(doc)
        fixed["paths"]["/s/S.X"]["post"]["requestBody"]["content"]["application/json"][
            "schema"] = openapi.schema(raw)
        check(fixed)


def test_names_a_path_cannot_carry_are_left_out():
    bad_services = ["a/b", "a{b", "a}b", "a b", "a\tb", "a?b", "a#b", "a%b", "a\x00b", "",
                    ".", "..", "x" * 129, "events", "v1"]
    bad_endpoints = ["A/B.C", "A{B}.C", "A B.C", "A.B\n", "A.B?x", "A#B.C", "A\x7f.B",
                     "Hello", "", "..", "A." + "x" * 200]
    services: dict[str, Any] = {
        name: [inst(name, [ep("Ok.Call")])] for name in bad_services}
    services["good"] = [inst("good", [ep(name) for name in [*bad_endpoints, "Good.Call"]])]
    services["web"] = [inst("web", [], metadata={"http": "x"})]
    doc = openapi.build(services)
    check(doc)
    assert set(doc["paths"]) == FIXED | {"/good/Good.Call", "/web/{path}"}


def test_operation_ids_are_safe_unique_and_the_output_deterministic():
    services = {
        "a:b": [inst("a:b", [ep("X.Y", describe(Empty))])],
        "a_b": [inst("a_b", [ep("X.Y", describe(Empty)), ep("X.Y.get")])],
        "a": [inst("a", [ep("b.C.D")])],
        "a.b": [inst("a.b", [ep("C.D")])],
        "ünï": [inst("ünï", [ep("Ç.D")])],
        "health": [inst("health", [ep("H.Check")])],
    }
    doc = openapi.build(services)
    check(doc)
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) for i in ids)
    assert {"a_b.X.Y", "a_b.X.Y_2", "a_b.X.Y.get", "a_b.X.Y.get_2", "a.b.C.D",
            "a.b.C.D_2", "health", "health.H.Check"} <= set(ids)
    assert "/ünï/Ç.D" in doc["paths"]

    shuffled = {k: list(reversed(v)) for k, v in reversed(services.items())}
    assert json.dumps(openapi.build(shuffled)) == json.dumps(doc)
    two = {"s": [inst("s", [ep("S.X", {"type": "integer"})], version="2", id="i2"),
                 inst("s", [ep("S.X", {"type": "string"})], version="1", id="i1")]}
    for order in (two, {"s": list(reversed(two["s"]))}):
        got = openapi.build(order)["paths"]["/s/S.X"]["post"]["requestBody"]
        assert got["content"]["application/json"]["schema"] == {"type": "integer"}


def test_malformed_records_are_skipped():
    services: dict[str, Any] = {
        "s": [None, "x", {"endpoints": "nope"}, {"endpoints": [None, {"name": 3}, {}]},
              inst("s", [ep("S.Ok")])],
        "t": "not a list",
        7: [inst("x", [ep("X.Y")])],
        "nohttp": [inst("nohttp", [ep("N.Call")], metadata={"http": ""})],  # no address
    }
    doc = openapi.build(services)
    check(doc)
    assert set(doc["paths"]) == FIXED | {"/s/S.Ok", "/nohttp/N.Call"}


TYPES = ["object", "array", "string", "integer", "number", "boolean", "null"]
KEYWORDS = [*openapi.KEYWORDS, "$ref", "allOf", "not", "oneOf", "$defs", "const"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.sampled_from([*TYPES, "nope", "date", "int32", "email", "$ref"])
           | st.text(max_size=6))
# arbitrary JSON-ish values: lists, maps with keyword, text or integer keys
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(KEYWORDS) | st.text(max_size=4) | st.integers(), children,
        max_size=4),
    max_leaves=12)
# nearly schemas: every keyword, each with a plausible or an arbitrary value
type_names = st.sampled_from([*TYPES, "nope"])
schemaish = st.recursive(
    scalars | st.lists(scalars, max_size=3) | st.dictionaries(
        st.sampled_from(KEYWORDS) | st.integers(), scalars, max_size=3),
    lambda children: st.fixed_dictionaries({}, optional={
        "type": type_names | st.lists(type_names, max_size=4) | children,
        "title": scalars,
        "properties": st.dictionaries(st.text(max_size=3) | st.integers(), children,
                                      max_size=4) | children,
        "required": st.lists(scalars, max_size=4) | children,
        "items": children, "additionalProperties": children,
        "anyOf": st.lists(children, max_size=3) | children,
        "enum": st.lists(scalars, max_size=4) | children,
        "format": st.sampled_from(["date", "int32", "email", "uuid"]) | scalars,
        "default": scalars | children, "$ref": scalars,
        "allOf": st.lists(children, max_size=2)}),
    max_leaves=20)
good_names = st.sampled_from(["S.A", "S.B", "Greeter.Hello", "svc", "other"])
names = st.one_of(good_names, good_names, st.text(st.sampled_from("aB.{}/?#% \t\x00é"),
                                                  max_size=6))
formats = json_values | schemaish
endpoints = st.builds(ep, names, formats, formats, st.booleans())
service_maps = st.dictionaries(
    names,
    st.lists(st.builds(inst, st.just("x"), st.lists(endpoints, min_size=1, max_size=2),
                       st.text(max_size=3)), min_size=1, max_size=2),
    max_size=2)
SEGMENT = r"[^/{}?#%\s]+"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(service_maps)
def test_any_formats_make_a_valid_document(services):
    doc = openapi.build(services)
    check(doc)
    for path in doc["paths"]:
        assert path in FIXED or re.fullmatch(rf"/{SEGMENT}/({SEGMENT}|\{{path\}})", path)
    for _, _, op in operations(doc):
        for media in op.get("requestBody", {}).get("content", {}).values():
            count, depth = nodes(media["schema"])
            assert count <= openapi.MAX_NODES and depth <= openapi.MAX_DEPTH
