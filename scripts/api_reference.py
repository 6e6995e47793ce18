"""The API reference page: one static HTML file rendered from the OpenAPI document.

The gateway serves it at `GET /docs`. It is self-contained on purpose: no script, no font or
style sheet from elsewhere (the gateway's Content-Security-Policy forbids both), so it renders
the same on a machine without internet and cannot be made to load anything. `make gen` writes
it to gen/api-reference.html beside gen/openapi.json.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from typing import Any

_METHOD_ORDER = ("get", "post", "put", "patch", "delete")

_STYLE = """
:root { --ink: #1d2330; --muted: #5b6472; --line: #e3e6eb; --tint: #f6f7f9; --link: #1f5fbf; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--tint);
  padding: 1px 4px; border-radius: 3px; }
nav { position: fixed; top: 0; bottom: 0; left: 0; width: 300px; overflow-y: auto; padding: 20px 16px;
  background: var(--tint); border-right: 1px solid var(--line); font-size: 13px; }
nav h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 18px 0 6px; }
nav ul { list-style: none; margin: 0; padding: 0; }
nav li { margin: 2px 0; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
main { margin-left: 300px; padding: 28px 40px 80px; max-width: 1100px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2.section { font-size: 22px; margin: 48px 0 12px; padding-top: 12px; border-top: 2px solid var(--line); }
section.operation, section.schema { margin: 28px 0; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 18px; margin: 8px 0; display: flex; align-items: center; gap: 10px; flex-wrap: wrap; }
h4 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.method { display: inline-block; min-width: 58px; text-align: center; font: bold 12px/1 ui-monospace, monospace;
  padding: 5px 6px; border-radius: 4px; color: #fff; text-transform: uppercase; }
.get { background: #2f7d4f; } .post { background: #1f5fbf; } .put { background: #8a5a00; }
.patch { background: #6b4aa8; } .delete { background: #b03a2e; }
.path { font: 15px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.summary { color: var(--muted); margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: 14px; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px; border-bottom: 1px solid var(--line); }
th { background: var(--tint); font-weight: 600; }
td.name { font-family: ui-monospace, monospace; white-space: nowrap; }
td.type { white-space: nowrap; color: var(--muted); }
.note { color: var(--muted); font-size: 13px; }
ul.values { margin: 4px 0; padding-left: 20px; }
"""


def render_reference(document: Mapping[str, Any]) -> str:
    """The whole page, as text."""
    info = document["info"]
    operations = list(_operations(document))
    schemas: Mapping[str, Any] = document["components"]["schemas"]
    body = [
        f"<h1>{_text(info['title'])} <span class=note>{_text(info['version'])}</span></h1>",
        f"<p class=summary>{_text(info.get('summary', ''))}</p>",
        _markdown(info.get("description", "")),
        _authentication(document),
        _errors(document),
    ]
    for tag in document.get("tags", []):
        body.append(f'<h2 class=section id="tag-{_attr(tag["name"])}">{_text(tag["name"])}</h2>')
        body.append(_markdown(tag.get("description", "")))
        body.extend(
            _operation(path, method, op, schemas) for path, method, op in operations if tag["name"] in op["tags"]
        )
    body.append('<h2 class=section id="schemas">Schemas</h2>')
    body.extend(_schema_section(name, schema) for name, schema in schemas.items())
    return (
        "<!doctype html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name=viewport content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(info['title'])}: API reference</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + _navigation(document, operations, schemas)
        + "<main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main>\n</body>\n</html>\n"
    )


def _operations(document: Mapping[str, Any]) -> Iterable[tuple[str, str, Mapping[str, Any]]]:
    for path, item in document["paths"].items():
        for method in _METHOD_ORDER:
            if method in item:
                yield path, method, item[method]


def _navigation(
    document: Mapping[str, Any], operations: list[tuple[str, str, Mapping[str, Any]]], schemas: Mapping[str, Any]
) -> str:
    parts = [
        "<nav>",
        f"<strong>{_text(document['info']['title'])}</strong>",
        '<h2>Overview</h2><ul><li><a href="#authentication">Authentication</a></li>'
        '<li><a href="#errors">Errors</a></li></ul>',
    ]
    for tag in document.get("tags", []):
        parts.append(f'<h2><a href="#tag-{_attr(tag["name"])}">{_text(tag["name"])}</a></h2><ul>')
        for path, method, operation in operations:
            if tag["name"] in operation["tags"]:
                name = operation["operationId"].split("_", 1)[-1]
                parts.append(
                    f'<li><a href="#{_attr(operation["operationId"])}" title="{_attr(path)}">'
                    f'<span class="method {method}">{method}</span> {_text(name)}</a></li>'
                )
        parts.append("</ul>")
    parts.append('<h2><a href="#schemas">Schemas</a></h2><ul>')
    parts.extend(f'<li><a href="#{_schema_id(name)}">{_text(name)}</a></li>' for name in schemas)
    parts.append("</ul></nav>\n")
    return "\n".join(parts)


def _authentication(document: Mapping[str, Any]) -> str:
    schemes = document["components"].get("securitySchemes", {})
    items = "".join(
        f"<p><code>Authorization: Bearer &lt;token&gt;</code> ({_text(scheme.get('bearerFormat', ''))}). "
        f"{_text(scheme.get('description', ''))}</p>"
        for scheme in schemes.values()
    )
    return f'<h2 class=section id="authentication">Authentication</h2>{items}'


def _errors(document: Mapping[str, Any]) -> str:
    responses = document["components"]["responses"]
    rows = "".join(
        f"<tr><td class=name>{_text(name.removeprefix('Error') or 'other')}</td>"
        f"<td>{_inline(response['description'])}</td></tr>"
        for name, response in responses.items()
    )
    return (
        '<h2 class=section id="errors">Errors</h2>'
        "<p>Every error, from the services and from the gateway alike, is a "
        f'<a href="#{_schema_id("google.rpc.Status")}">google.rpc.Status</a> as JSON.</p>'
        f"<table><tr><th>HTTP status</th><th>When</th></tr>{rows}</table>"
    )


def _operation(path: str, method: str, operation: Mapping[str, Any], schemas: Mapping[str, Any]) -> str:
    parts = [
        f'<section class=operation id="{_attr(operation["operationId"])}">',
        f'<h3><span class="method {method}">{method}</span><span class=path>{_text(path)}</span></h3>',
        f"<p class=note>{_text(operation['operationId'])}</p>",
        _markdown(operation.get("description", "")),
    ]
    parameters = operation.get("parameters", [])
    if parameters:
        parts.append("<h4>Parameters</h4><table><tr><th>Name</th><th>In</th><th>Type</th><th>Description</th></tr>")
        for parameter in parameters:
            required = " <span class=note>required</span>" if parameter.get("required") else ""
            parts.append(
                f"<tr><td class=name>{_text(parameter['name'])}{required}</td><td>{_text(parameter['in'])}</td>"
                f"<td class=type>{_type(parameter['schema'])}</td>"
                f"<td>{_inline(parameter.get('description', ''))}</td></tr>"
            )
        parts.append("</table>")
    request_body = operation.get("requestBody")
    if request_body is not None:
        parts.append("<h4>Request body</h4>")
        parts.append(_schema_summary(request_body["content"]["application/json"]["schema"], schemas))
    ok = operation["responses"]["200"]
    parts.append("<h4>Response</h4>")
    if "application/json" in ok["content"]:
        parts.append(_schema_summary(ok["content"]["application/json"]["schema"], schemas))
    else:  # the body itself (google.api.HttpBody), as its content type says; no token asked
        parts.append("<p>The body itself, in its own content type (not JSON). No bearer token.</p>")
    errors = [status for status in operation["responses"] if status not in ("200", "default")]
    parts.append(
        f'<p class=note>Errors: {", ".join(errors)} and others, each a <a href="#errors">google.rpc.Status</a>.</p>'
    )
    parts.append("</section>")
    return "\n".join(parts)


def _schema_summary(schema: Mapping[str, Any], schemas: Mapping[str, Any]) -> str:
    """A body's fields, with a link to its schema when it has a name."""
    if "$ref" in schema:
        named = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return f"<p class=note>{_type(schema)}</p>" + _properties_table({**named, "description": ""})
    return _properties_table(schema)


def _schema_section(name: str, schema: Mapping[str, Any]) -> str:
    parts = [f'<section class=schema id="{_schema_id(name)}">', f"<h3>{_text(name)}</h3>"]
    if "enum" in schema:
        parts.append(_markdown(schema.get("description", "")))
        values = "".join(f"<li><code>{_text(value)}</code></li>" for value in schema["enum"])
        parts.append(f"<ul class=values>{values}</ul>")
    else:
        parts.append(_properties_table(schema))
    parts.append("</section>")
    return "\n".join(parts)


def _properties_table(schema: Mapping[str, Any]) -> str:
    parts = [_markdown(schema.get("description", ""))]
    properties = schema.get("properties", {})
    if not properties:
        parts.append("<p class=note>No fields.</p>")
        return "\n".join(parts)
    parts.append("<table><tr><th>Field</th><th>Type</th><th>Description</th></tr>")
    for field, field_schema in properties.items():
        parts.append(
            f"<tr><td class=name>{_text(field)}</td><td class=type>{_type(field_schema)}</td>"
            f"<td>{_inline(field_schema.get('description', ''))}</td></tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def _type(schema: Mapping[str, Any]) -> str:
    """A schema's type in a few words, with links to named schemas."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f'<a href="#{_schema_id(name)}">{_text(name.rsplit(".", 1)[-1])}</a>'
    if "oneOf" in schema:
        return " | ".join(_type(option) for option in schema["oneOf"])
    if "allOf" in schema:
        return " + ".join(_type(part) for part in schema["allOf"] if "$ref" in part) or "object"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"map of string to {_type(schema['additionalProperties'])}"
    text = " | ".join(kind) if isinstance(kind, list) else str(kind)
    if "format" in schema:
        text += f" ({schema['format']})"
    return _text(text)


def _markdown(text: str) -> str:
    """The little Markdown the proto comments use: paragraphs, `- ` lists and `code`."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if not block:
            continue
        lines = block.split("\n")
        if all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
            blocks.append(f"<ul class=values>{items}</ul>")
        else:
            blocks.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(blocks)


def _inline(text: str) -> str:
    escaped = _text(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _text(value: object) -> str:
    return html.escape(str(value), quote=False)


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def _schema_id(name: str) -> str:
    return "schema-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)
