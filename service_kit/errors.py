"""The error model: domain errors with stable reasons, rendered as google.rpc.Status.

Domain code raises `DomainError` subclasses (no gRPC import needed); each service's servicer
owns the one table that maps them to status codes, and the interceptor renders them with one
`ErrorInfo` (and a `BadRequest` for invalid input). See https://google.aip.dev/193.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# ErrorInfo.reason is UPPER_SNAKE_CASE and at most 63 characters (AIP-193).
MAX_REASON_LENGTH = 63


class DomainError(Exception):
    """An expected refusal. Subclasses set `reason`; the servicer's table sets the code."""

    reason: ClassVar[str] = "UNSPECIFIED"
    # The fields at fault, for a BadRequest (bad input only).
    violations: tuple[FieldViolation, ...] = ()

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(DomainError):
    """Bad input, caught at the edge; carries one violation per bad field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], *, reason: str | None = None) -> None:
        assert violations, "an InvalidArgument names at least one field"
        self.violations = tuple(violations)
        first = self.violations[0]
        super().__init__(
            "; ".join(f"{v.field}: {v.description}" for v in self.violations),
            metadata={"field": first.field},
        )
        if reason is not None:
            self.reason = reason  # type: ignore[misc]  # a finer reason for one instance, e.g. NONEXISTENT_LOCAL_TIME

    @classmethod
    def of(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls([FieldViolation(field, description)], reason=reason)


class Unavailable(DomainError):
    """A dependency (the database, another service) cannot be reached; retrying may help."""

    reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message, metadata=metadata)
        if reason is not None:
            self.reason = reason  # type: ignore[misc]  # which dependency, e.g. DATABASE_UNAVAILABLE


class DeadlineExceeded(DomainError):
    """The call's time budget ran out before the work finished."""

    reason = "DEADLINE_EXCEEDED"


def rich_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[FieldViolation] = (),
) -> grpc.Status:
    """A status with one ErrorInfo and, for bad input, a BadRequest."""
    return rpc_status.to_status(
        status_message(code, reason, message, domain=domain, metadata=metadata, violations=violations)
    )


def status_message(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[FieldViolation] = (),
) -> status_pb2.Status:
    """The google.rpc.Status of `rich_status`, as a message (the outcome of one item of a batch)."""
    assert reason.isupper() and len(reason) <= MAX_REASON_LENGTH, reason
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata or {})))
    details.append(info)
    if violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in violations
                ]
            )
        )
        details.append(bad_request)
    return status_pb2.Status(code=_code_number(code), message=message, details=details)


def _code_number(code: grpc.StatusCode) -> int:
    number = code.value[0]
    assert isinstance(number, int)
    assert code_pb2.Code.Name(number), code
    return number


def status_for(error: DomainError, code: grpc.StatusCode, *, domain: str) -> grpc.Status:
    return rpc_status.to_status(status_message_for(error, code, domain=domain))


def status_message_for(error: DomainError, code: grpc.StatusCode, *, domain: str) -> status_pb2.Status:
    return status_message(
        code, error.reason, error.message, domain=domain, metadata=error.metadata, violations=error.violations
    )


@dataclass(frozen=True)
class ErrorDetails:
    """What a client reads back from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    field_violations: dict[str, str]


def error_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Reads ErrorInfo and BadRequest from a failed call (client side)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # AioRpcError has the same accessors
    return _details(error.code(), error.details() or "", status)


_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_message_details(status: status_pb2.Status) -> ErrorDetails:
    """Reads ErrorInfo and BadRequest from a google.rpc.Status message (one item of a batch)."""
    return _details(_CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status)


def _details(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> ErrorDetails:
    reason = domain = None
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    if status is not None:
        message = status.message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations = {v.field: v.description for v in bad_request.field_violations}
    return ErrorDetails(code, message, reason, domain, metadata, violations)
