"""The OpenAPI 3.1 description of the HTTP/JSON API, built from the protos' descriptor set.

Input: the FileDescriptorSet that `make gen` writes for Envoy (gen/descriptor.binpb, with source
info, so the proto comments become descriptions). Every method with a `google.api.http`
annotation is one operation; the schemas follow the JSON that the gateway's transcoder reads and
writes (devstack/gateway.py): proto field names, enums by name, 64-bit integers as decimal
strings, Timestamps as RFC 3339 strings, FieldMasks as comma-separated paths. Errors are the
google.rpc.Status JSON with its ErrorInfo and BadRequest details, from the services and from the
gateway alike (docs/http-api.md).

`build_document(descriptor_set_bytes)` returns the document as plain data; scripts/
generate_protos.py writes it to gen/openapi.json, and a test validates it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

# The message of a response that is no JSON message but the body itself (google/api/httpbody.proto).
HTTP_BODY = ".google.api.HttpBody"

SERVICES = ("booking.v1.BookingService", "credit.v1.CreditService")
TITLE = "Therapy booking API"
VERSION = "v1"
ERROR_SCHEMA = "google.rpc.Status"
# The error responses every operation may give, besides its own 200 (docs/http-api.md, "Errors").
ERROR_RESPONSES = {
    "400": "Bad input (INVALID_ARGUMENT, with a BadRequest naming the field) or a refused precondition "
    "(FAILED_PRECONDITION, e.g. INSUFFICIENT_CREDITS, SLOT_UNAVAILABLE); a malformed body or URL.",
    "401": "No bearer token, or one that is expired or not valid (TOKEN_MISSING, TOKEN_EXPIRED, TOKEN_INVALID).",
    "403": "The caller may not make this call (PERMISSION_DENIED).",
    "404": "The resource does not exist or is not the caller's, or no route has this path and method.",
    "409": "The request_id was used before with other values (REQUEST_ID_REUSED), or a conflict.",
    "413": "The body is larger than the gateway's limit (REQUEST_BODY_TOO_LARGE).",
    "429": "Too many calls in flight for this caller (TOO_MANY_CONCURRENT_REQUESTS).",
    "503": "The service is unavailable; retry later.",
    "504": "The call ran out of time.",
}

# descriptor.proto's numbers for the paths of SourceCodeInfo.Location.
_MESSAGE_TYPE, _ENUM_TYPE, _SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2
_FIELD = descriptor_pb2.FieldDescriptorProto
_INT32 = {"type": "integer", "format": "int32"}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# The transcoder reads a number or a string and always writes a string (proto3 JSON).
_INT64 = {"type": ["string", "integer"], "format": "int64", "pattern": r"^-?[0-9]+$"}
_SCALARS: dict[int, dict[str, Any]] = {
    _FIELD.TYPE_STRING: {"type": "string"},
    _FIELD.TYPE_BOOL: {"type": "boolean"},
    _FIELD.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    _FIELD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _FIELD.TYPE_FLOAT: {"type": "number", "format": "float"},
    _FIELD.TYPE_INT32: _INT32,
    _FIELD.TYPE_SINT32: _INT32,
    _FIELD.TYPE_SFIXED32: _INT32,
    _FIELD.TYPE_UINT32: _UINT32,
    _FIELD.TYPE_FIXED32: _UINT32,
    _FIELD.TYPE_INT64: _INT64,
    _FIELD.TYPE_SINT64: _INT64,
    _FIELD.TYPE_SFIXED64: _INT64,
    _FIELD.TYPE_UINT64: _INT64,
    _FIELD.TYPE_FIXED64: _INT64,
}
# The wrapper types: their value, or null.
_WRAPPERS: dict[str, dict[str, Any]] = {
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "int64", "minimum": 0},
    "google.protobuf.Int64Value": {"type": ["string", "integer", "null"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "integer", "null"], "format": "int64"},
    "google.protobuf.FloatValue": {"type": ["number", "null"], "format": "float"},
    "google.protobuf.DoubleValue": {"type": ["number", "null"], "format": "double"},
}
# Well-known types have JSON forms of their own, not that of their fields.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Field paths separated by commas, e.g. `display_name,time_zone`.",
    },
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    **_WRAPPERS,
}
# The details the services and the gateway put in an error, by their Any type URL.
_ERROR_DETAILS = ("google.rpc.ErrorInfo", "google.rpc.BadRequest")


@dataclass(frozen=True)
class _Message:
    proto: descriptor_pb2.DescriptorProto
    comments: Mapping[tuple[int, ...], str]
    path: tuple[int, ...]


@dataclass(frozen=True)
class _Enum:
    proto: descriptor_pb2.EnumDescriptorProto
    comments: Mapping[tuple[int, ...], str]
    path: tuple[int, ...]


class _Types:
    """Every message and enum of the descriptor set, by full name, with its comments."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, _Enum] = {}
        self.files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self.file_comments: dict[str, Mapping[tuple[int, ...], str]] = {}
        for file in descriptor_set.file:
            comments = {
                tuple(location.path): _clean_comment(location.leading_comments)
                for location in file.source_code_info.location
                if location.leading_comments.strip()
            }
            self.files[file.name] = file
            self.file_comments[file.name] = comments
            prefix = f"{file.package}." if file.package else ""
            for index, message in enumerate(file.message_type):
                self._add_message(prefix, message, comments, (_MESSAGE_TYPE, index))
            for index, enum in enumerate(file.enum_type):
                self.enums[prefix + enum.name] = _Enum(enum, comments, (_ENUM_TYPE, index))

    def _add_message(
        self,
        prefix: str,
        message: descriptor_pb2.DescriptorProto,
        comments: Mapping[tuple[int, ...], str],
        path: tuple[int, ...],
    ) -> None:
        name = prefix + message.name
        self.messages[name] = _Message(message, comments, path)
        for index, nested in enumerate(message.nested_type):
            self._add_message(f"{name}.", nested, comments, (*path, _MESSAGE_NESTED, index))
        for index, enum in enumerate(message.enum_type):
            self.enums[f"{name}.{enum.name}"] = _Enum(enum, comments, (*path, _MESSAGE_ENUM, index))


def _clean_comment(text: str) -> str:
    """A proto comment as Markdown: the space after `//` gone, paragraphs kept, buf's lint
    directives (`buf:lint:ignore ...`, for the linter, not for readers) left out."""
    lines = [line.removeprefix(" ").rstrip() for line in text.strip("\n").split("\n")]
    lines = [line for line in lines if not line.startswith("buf:lint:")]
    return "\n".join(lines).strip()


def _summary(description: str) -> str:
    """The first sentence of a description."""
    first_paragraph = description.split("\n\n", 1)[0].replace("\n", " ")
    match = re.match(r"(.+?\.)(\s|$)", first_paragraph)
    return match.group(1) if match else first_paragraph


class _Builder:
    def __init__(self, types: _Types) -> None:
        self.types = types
        self.schemas: dict[str, dict[str, Any]] = {}

    # --- schemas --------------------------------------------------------------------------------

    def ref(self, type_name: str) -> dict[str, Any]:
        """A reference to a message's or enum's schema (made on first use), or its inline form."""
        name = type_name.lstrip(".")
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.schemas:
            self.schemas[name] = {}  # a placeholder first: messages may refer to themselves
            self.schemas[name] = self._enum_schema(name) if name in self.types.enums else self._message_schema(name)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum_schema(self, name: str) -> dict[str, Any]:
        enum = self.types.enums[name]
        values = [value.name for value in enum.proto.value]
        lines = []
        for index, value in enumerate(enum.proto.value):
            comment = enum.comments.get((*enum.path, _ENUM_VALUE, index))
            if comment:
                lines.append(f"- `{value.name}`: {comment.replace(chr(10), ' ')}")
        description = enum.comments.get(enum.path, "")
        if lines:
            description = (description + "\n\n" if description else "") + "\n".join(lines)
        schema: dict[str, Any] = {"type": "string", "enum": values}
        if description:
            schema["description"] = description
        return schema

    def _message_schema(self, name: str, *, leave_out: Iterable[str] = ()) -> dict[str, Any]:
        message = self.types.messages[name]
        skipped = set(leave_out)
        properties: dict[str, Any] = {}
        for index, field in enumerate(message.proto.field):
            if field.name in skipped:
                continue
            schema = self.field_schema(field)
            comment = message.comments.get((*message.path, _MESSAGE_FIELD, index))
            if comment:
                schema["description"] = comment
            properties[field.name] = schema
        result: dict[str, Any] = {"type": "object", "properties": properties}
        description = message.comments.get(message.path, "")
        oneofs = self._oneof_notes(message, skipped)
        if oneofs:
            description = "\n\n".join(part for part in (description, *oneofs) if part)
        if description:
            result["description"] = description
        return result

    def _oneof_notes(self, message: _Message, skipped: set[str]) -> list[str]:
        notes = []
        for index, oneof in enumerate(message.proto.oneof_decl):
            members = [
                field.name
                for field in message.proto.field
                if field.HasField("oneof_index")
                and field.oneof_index == index
                and not field.proto3_optional
                and field.name not in skipped
            ]
            if len(members) < 2:
                continue
            comment = message.comments.get((*message.path, _MESSAGE_ONEOF, index), "")
            listed = ", ".join(f"`{member}`" for member in members)
            notes.append(f"`{oneof.name}`: at most one of {listed}. {comment}".strip())
        return notes

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.label == _FIELD.LABEL_REPEATED:
            entry = self._map_entry(field)
            if entry is not None:
                return {"type": "object", "additionalProperties": self._single(entry.field[1])}
            return {"type": "array", "items": self._single(field)}
        return self._single(field)

    def _map_entry(self, field: descriptor_pb2.FieldDescriptorProto) -> descriptor_pb2.DescriptorProto | None:
        if field.type != _FIELD.TYPE_MESSAGE:
            return None
        message = self.types.messages.get(field.type_name.lstrip("."))
        if message is None or not message.proto.options.map_entry:
            return None
        return message.proto

    def _single(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type in (_FIELD.TYPE_MESSAGE, _FIELD.TYPE_ENUM):
            return self.ref(field.type_name)
        return dict(_SCALARS[field.type])

    # --- operations -----------------------------------------------------------------------------

    def paths(self) -> dict[str, dict[str, Any]]:
        paths: dict[str, dict[str, Any]] = {}
        for service_name in SERVICES:
            file, service_index, service = self._service(service_name)
            comments = self.types.file_comments[file.name]
            for method_index, method in enumerate(service.method):
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule = method.options.Extensions[annotations_pb2.http]
                verb, template = _verb_and_template(rule)
                description = comments.get((_SERVICE, service_index, _SERVICE_METHOD, method_index), "")
                operation = self._operation(service_name, method, rule, template, description)
                paths.setdefault(_openapi_path(template), {})[verb] = operation
        return paths

    def tags(self) -> list[dict[str, str]]:
        tags = []
        for service_name in SERVICES:
            file, service_index, _ = self._service(service_name)
            description = self.types.file_comments[file.name].get((_SERVICE, service_index), "")
            tags.append({"name": service_name.rsplit(".", 1)[1], "description": description})
        return tags

    def _service(self, full_name: str) -> tuple[descriptor_pb2.FileDescriptorProto, int, Any]:
        package, _, name = full_name.rpartition(".")
        for file in self.types.files.values():
            if file.package == package:
                for index, service in enumerate(file.service):
                    if service.name == name:
                        return file, index, service
        raise AssertionError(f"{full_name} is not in the descriptor set")

    def _operation(
        self,
        service_name: str,
        method: descriptor_pb2.MethodDescriptorProto,
        rule: http_pb2.HttpRule,
        template: str,
        description: str,
    ) -> dict[str, Any]:
        request_name = method.input_type.lstrip(".")
        request = self.types.messages[request_name]
        path_fields = re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", template)
        parameters = [self._path_parameter(request_name, field_path) for field_path in path_fields]
        top_level_path_fields = {field_path.split(".")[0] for field_path in path_fields}
        operation: dict[str, Any] = {
            "operationId": f"{service_name.rsplit('.', 1)[1]}_{method.name}",
            "tags": [service_name.rsplit(".", 1)[1]],
            "summary": _summary(description) or method.name,
            "description": description,
        }
        if rule.body == "*":
            operation["requestBody"] = self._body(self._body_schema(request_name, top_level_path_fields))
        elif rule.body:
            body_field = next(field for field in request.proto.field if field.name == rule.body)
            operation["requestBody"] = self._body(self.field_schema(body_field))
            parameters += self._query_parameters(request, top_level_path_fields | {rule.body})
        else:
            parameters += self._query_parameters(request, top_level_path_fields)
        if parameters:
            operation["parameters"] = parameters
        response_schema = self.ref(method.output_type)
        if rule.response_body:
            response = self.types.messages[method.output_type.lstrip(".")]
            field = next(field for field in response.proto.field if field.name == rule.response_body)
            response_schema = self.field_schema(field)
        content: dict[str, Any] = {"application/json": {"schema": response_schema}}
        if method.output_type == HTTP_BODY:
            # Any content at all, as the method sets it (a calendar feed is text/calendar); such a
            # method carries its own credential in the request, so it asks for no bearer token.
            content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
            operation["security"] = []
        operation["responses"] = {
            "200": {"description": "OK", "content": content},
            **{status: {"$ref": f"#/components/responses/Error{status}"} for status in ERROR_RESPONSES},
            "default": {"$ref": "#/components/responses/Error"},
        }
        return operation

    def _body(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    def _body_schema(self, request_name: str, path_fields: set[str]) -> dict[str, Any]:
        if not path_fields:
            return self.ref(request_name)
        # The request without the fields that the path carries.
        return self._message_schema(request_name, leave_out=path_fields)

    def _path_parameter(self, request_name: str, field_path: str) -> dict[str, Any]:
        field, comment = self._resolve(request_name, field_path)
        parameter: dict[str, Any] = {
            "name": field_path,
            "in": "path",
            "required": True,
            "schema": self.field_schema(field),
        }
        if comment:
            parameter["description"] = comment
        return parameter

    def _resolve(self, message_name: str, field_path: str) -> tuple[descriptor_pb2.FieldDescriptorProto, str]:
        """A field by its dotted path from a message, and its comment."""
        message = self.types.messages[message_name]
        parts = field_path.split(".")
        for depth, part in enumerate(parts):
            index, field = next((i, f) for i, f in enumerate(message.proto.field) if f.name == part)
            if depth == len(parts) - 1:
                return field, message.comments.get((*message.path, _MESSAGE_FIELD, index), "")
            message = self.types.messages[field.type_name.lstrip(".")]
        raise AssertionError(field_path)

    def _query_parameters(self, request: _Message, excluded: set[str]) -> list[dict[str, Any]]:
        parameters = []
        for index, field in enumerate(request.proto.field):
            if field.name in excluded:
                continue
            schema = self.field_schema(field)
            if "$ref" in schema and field.type == _FIELD.TYPE_MESSAGE:
                continue  # a message other than a well-known type cannot travel in a query string
            parameter: dict[str, Any] = {"name": field.name, "in": "query", "schema": schema}
            if schema.get("type") == "array":
                parameter["explode"] = True
            comment = request.comments.get((*request.path, _MESSAGE_FIELD, index))
            if comment:
                parameter["description"] = comment
            parameters.append(parameter)
        return parameters

    # --- errors ---------------------------------------------------------------------------------

    def error_components(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The error schema (google.rpc.Status with its details typed) and the error responses."""
        status = self._message_schema(ERROR_SCHEMA)
        details = []
        for name in _ERROR_DETAILS:
            type_url = {"type": "object", "properties": {"@type": {"const": f"type.googleapis.com/{name}"}}}
            details.append({"allOf": [{**type_url, "required": ["@type"]}, self.ref(name)]})
        status["properties"]["details"] = {
            "type": "array",
            "items": {"oneOf": details},
            "description": "One google.rpc.ErrorInfo whose `reason` is stable (branch on it, never on the "
            "message), and for bad input a google.rpc.BadRequest naming each field.",
        }
        status["description"] = (
            "Every error: the gRPC status as JSON. `code` is the gRPC code number, `message` is for people."
        )
        self.schemas[ERROR_SCHEMA] = status
        error_ref = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
        responses = {
            f"Error{status_code}": {"description": text, "content": {"application/json": {"schema": error_ref}}}
            for status_code, text in ERROR_RESPONSES.items()
        }
        responses["Error"] = {
            "description": "Any other error, in the same shape.",
            "content": {"application/json": {"schema": error_ref}},
        }
        return self.schemas, responses


def _verb_and_template(rule: http_pb2.HttpRule) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    assert pattern is not None and pattern != "custom", "custom HTTP verbs are not supported"
    return pattern, getattr(rule, pattern)


def _openapi_path(template: str) -> str:
    """`/v1/things/{name=things/*}` becomes `/v1/things/{name}`."""
    return re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", template)


def build_document(descriptor_set_bytes: bytes) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every public HTTP route."""
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes)
    builder = _Builder(_Types(descriptor_set))
    paths = builder.paths()
    schemas, responses = builder.error_components()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "summary": "Book therapy sessions paid with credits: therapists' availability, bookings, credit accounts.",
            "description": _API_DESCRIPTION,
        },
        "servers": [{"url": "/", "description": "This gateway"}],
        "security": [{"bearerAuth": []}],
        "tags": builder.tags(),
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "responses": responses,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT from the identity provider the services trust (RS256, ES256 or "
                    "EdDSA), carrying the caller's id and roles: client, therapist, admin, service. At most "
                    "8 KiB.",
                }
            },
        },
    }


_API_DESCRIPTION = """\
The HTTP/JSON face of two gRPC services: the booking service (therapists, their availability,
bookings) and the credit service (accounts, the ledger, reservations). Every call needs a bearer
token; who may call what is in the operators' documentation (docs/security.md).

JSON as the gateway speaks it: field names as in the protos (`snake_case`), enums by name,
64-bit integers as decimal strings (a number is accepted in a request), instants as RFC 3339
strings in UTC. A body must be strict JSON (RFC 8259). Unknown query parameters are refused;
unknown body fields are ignored.

Every error has the same shape, `google.rpc.Status`: a `code`, a `message` for people, and
`details` with one `google.rpc.ErrorInfo` whose `reason` is stable. Mutations carry a
`request_id`: a retry with the same id returns the first answer."""
