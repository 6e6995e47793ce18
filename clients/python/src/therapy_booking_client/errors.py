"""Refusals of the services as typed exceptions.

Every refusal the services give carries a google.rpc.ErrorInfo with a stable `reason` and its
`metadata` (the README of the repository lists the reasons), and for bad input a BadRequest
naming each field. `refusal_from(error)` turns a gRPC error into the most specific class here:
one per well-known reason (`InsufficientCredits`, `SlotUnavailable`, ...), each a subclass of the
class of its gRPC code (`FailedPrecondition`, `NotFound`, ...), all of them `Refusal`. Branch on
the class or on `reason`, never on the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class Refusal(Exception):
    """A call the service answered with an error."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str,
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(f"{reason}: {message}" if reason else message)
        self.message = message
        self.code = code
        # The ErrorInfo's stable reason, e.g. INSUFFICIENT_CREDITS; "" when the error had none
        # (a failure below the services, e.g. no connection).
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations = field_violations


class InvalidArgument(Refusal):
    """Bad input; `field_violations` names each field."""


class FailedPrecondition(Refusal):
    """The request is well formed but the state refuses it."""


class NotFound(Refusal):
    """No such resource (or not the caller's)."""


class AlreadyExists(Refusal):
    """Already there, e.g. a request_id used with other values."""


class Aborted(Refusal):
    """A conflict that a retry may resolve, e.g. the same request in progress elsewhere."""


class PermissionDenied(Refusal):
    """The caller may not make this call."""


class Unauthenticated(Refusal):
    """No token, or one that is expired or not valid."""


class ResourceExhausted(Refusal):
    """A bound was reached, e.g. too many calls in flight for this caller."""


class Unavailable(Refusal):
    """The service cannot answer now; retrying later may succeed."""


class DeadlineExceeded(Refusal):
    """The call ran out of time."""


class Internal(Refusal):
    """A failure in the service (UNKNOWN, INTERNAL, DATA_LOSS or anything else)."""


class InsufficientCredits(FailedPrecondition):
    """The client's available credits do not cover the price (`available`, `requested`)."""


class SlotUnavailable(FailedPrecondition):
    """The therapist is booked at that time."""


class OutsideAvailability(FailedPrecondition):
    """The time is outside the therapist's hours."""


class AccountNotFound(Refusal):
    """The owner has no credit account (NOT_FOUND on a read, FAILED_PRECONDITION on a booking)."""


class RequestIdReused(AlreadyExists):
    """The request_id was used before with other values: use a new one."""


class RequestInProgress(Aborted):
    """Another copy of this request is being answered: retry with the same request_id."""


_BY_CODE: dict[grpc.StatusCode, type[Refusal]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
_BY_REASON: dict[str, type[Refusal]] = {
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "SLOT_UNAVAILABLE": SlotUnavailable,
    "OUTSIDE_AVAILABILITY": OutsideAvailability,
    "ACCOUNT_NOT_FOUND": AccountNotFound,
    "REQUEST_ID_REUSED": RequestIdReused,
    "REQUEST_IN_PROGRESS": RequestInProgress,
}


def refusal_from(error: grpc.aio.AioRpcError) -> Refusal:
    """The typed refusal of a failed call, with the reason, metadata and fields it carried."""
    code = error.code()
    reason, domain, metadata, violations = "", "", {}, []
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError is a grpc.Call
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, Internal)
    return kind(
        error.details() or code.name,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
    )
