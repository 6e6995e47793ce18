"""The server interceptor every RPC goes through.

For each call it binds the request context to the log (contextvars, cleared per call): the
request id (the caller's `x-request-id`, or a new one); gives the call a time budget
(the caller's deadline, or a default for calls that come without one, such as HTTP transcoded by
Envoy), renders domain errors with the service's one table of codes, turns infrastructure
failures into UNAVAILABLE, hides unexpected exceptions behind INTERNAL
(traceback logged here, never sent), writes one canonical line per RPC, and tells its observers
(the metrics) that a call started and how it finished.

Traces are not made here: with tracing on (service_kit/tracing.py) OpenTelemetry's server
interceptor runs before this one, so its span is active while the call is served; this
interceptor then only records the call's outcome on that span (status code, reason, request id).
With tracing off nothing about traces happens per call.

An aio interceptor only resolves the handler, so the work happens in a wrapper around
`handler.unary_unary` (docs/conventions.md). The wrapper also decodes the request (the method is
registered without a deserializer, service_kit/decoding.py): bytes that are not a message of the
method's type are refused INVALID_ARGUMENT like any other bad input, after authorization has read
what it can of them.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import structlog

from service_kit.auth import (
    CallerLimits,
    Gate,
    PermissionDenied,
    TooManyConcurrentCalls,
    Unauthenticated,
    bind_principal,
    unbind_principal,
)
from service_kit.decoding import MalformedRequest, RequestDecoder
from service_kit.errors import DomainError, InvalidArgument, Unavailable, rich_status, status_for

log = structlog.get_logger()

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_HEADER_LENGTH = 128
# A TimeoutError this close to the call's deadline is the deadline itself.
TIMEOUT_SLACK_S = 0.05
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("rpc_deadline", default=None)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("rpc_request_id", default=None)

ErrorTable = Mapping[type[DomainError], grpc.StatusCode]
Metadata = Iterable[tuple[str, str | bytes]]
# Told when a call starts: (service, rpc), e.g. ("booking.v1.BookingService", "CreateBooking").
RpcStartObserver = Callable[[str, str], None]
# Told when a call finishes: (service, rpc, code, reason, duration_s); reason is the ErrorInfo
# reason of a refusal or failure rendered here, None for OK and for a status the handler set itself.
RpcObserver = Callable[[str, str, grpc.StatusCode, str | None, float], None]


def remaining_budget_s() -> float | None:
    """Seconds left of the current RPC's budget, for deadlines of downstream calls."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


def current_request_id() -> str | None:
    return _request_id.get()


# Failures of the database connection rather than of the statement: retrying later may work.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A pooled connection that the server terminated while it sat idle (pg_terminate_backend, a
    # restart): asyncpg has read the server's FATAL but not yet the closed socket, and refuses the
    # next statement with "cannot switch to state N; another operation (2) is in progress". The
    # pool discards the connection when that happens, so a retry gets a fresh one.
    asyncpg.InternalClientError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)


# Codes of the refusals every service shares (the services' own tables come first).
_SHARED_CODES: dict[type[DomainError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    TooManyConcurrentCalls: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
}


def code_for(error: DomainError, error_codes: ErrorTable) -> grpc.StatusCode:
    """The status code of a domain error: the service's table first, then the shared one."""
    for kind in type(error).__mro__:
        code = error_codes.get(kind)
        if code is not None:
            return code
    for kind in type(error).__mro__:
        code = _SHARED_CODES.get(kind)
        if code is not None:
            return code
    log.error("unmapped_domain_error", error_type=type(error).__name__)
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str | None = None
    status: grpc.Status | None = None


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        domain: str,
        error_codes: ErrorTable,
        default_deadline_s: float,
        observers: tuple[RpcObserver, ...] = (),
        start_observers: tuple[RpcStartObserver, ...] = (),
        gate: Gate | None = None,
        max_concurrent_rpcs_per_caller: int = 64,
        traced: bool = False,
    ) -> None:
        """`gate` authenticates and authorizes every call but those of the open services (health,
        reflection); None only in tests of the interceptor itself. `traced`: OpenTelemetry's
        server interceptor runs before this one, and each call's outcome goes on its span."""
        self._gate = gate
        self._caller_limits = CallerLimits(max_concurrent_rpcs_per_caller)
        self._domain = domain
        self._error_codes = error_codes
        self._default_deadline_s = default_deadline_s
        self._observers = observers
        self._start_observers = start_observers
        self._traced = traced
        # One decoder per method, made on its first call (the methods are the registered ones).
        self._decoders: dict[str, RequestDecoder | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if method not in self._decoders:
            deserializer = handler.request_deserializer
            self._decoders[method] = RequestDecoder.of(deserializer) if deserializer is not None else None
        decoder = self._decoders[method]
        if handler.unary_unary is None:
            return handler if decoder is None else self._decoding_stream_handler(handler, decoder)
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary, decoder),
            # The raw bytes: the wrapper decodes them, so that bytes which are no message are the
            # caller's INVALID_ARGUMENT rather than grpc's UNKNOWN (service_kit/decoding.py).
            request_deserializer=None if decoder is not None else handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self, method: str, behaviour: Callable[..., Any], decoder: RequestDecoder | None
    ) -> Callable[..., Awaitable[Any]]:
        service, _, rpc = method.lstrip("/").rpartition("/")

        async def wrapped(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            structlog.contextvars.clear_contextvars()
            for start_observer in self._start_observers:
                start_observer(service, rpc)
            # Read once: grpcio converts the metadata anew on each read.
            metadata: Metadata = context.invocation_metadata() or ()
            request_id = _incoming_request_id(metadata)
            structlog.contextvars.bind_contextvars(rpc=rpc, request_id=request_id)
            started = time.perf_counter()
            budget_s = _budget_s(context, self._default_deadline_s)
            deadline_token = _deadline.set(asyncio.get_running_loop().time() + budget_s)
            request_id_token = _request_id.set(request_id)
            outcome = Outcome(grpc.StatusCode.OK)
            principal_token = bind_principal(None)
            limited_subject: str | None = None
            try:
                request, limited_subject = self._admit(service, rpc, decoder, raw, metadata)
                async with asyncio.timeout(budget_s):
                    return await behaviour(request, context)
            except asyncio.CancelledError:
                # The caller went away (cancelled, or its deadline passed) or the server is
                # stopping: gRPC cancels the handler and no status can be sent, but the canonical
                # line and the metrics must not count the call as OK (CancelledError is not an
                # Exception, so without this the initial OK outcome stood).
                remaining_s = remaining_budget_s()
                expired = remaining_s is not None and remaining_s <= TIMEOUT_SLACK_S
                outcome = Outcome(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
                raise
            except Exception as error:  # every failure becomes a status below
                outcome = self._outcome(error, context)
                if outcome.status is None:
                    raise  # the handler aborted on its own; its status stands
                await context.abort_with_status(outcome.status)
            finally:
                if limited_subject is not None:
                    self._caller_limits.release(limited_subject)
                unbind_principal(principal_token)
                duration_s = time.perf_counter() - started
                _deadline.reset(deadline_token)
                _request_id.reset(request_id_token)
                if self._traced:
                    _record_on_span(outcome, request_id)
                self._finish(service, rpc, outcome, duration_s)

        return wrapped

    def _decoding_stream_handler(
        self, handler: grpc.RpcMethodHandler[Any, Any], decoder: RequestDecoder
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A streaming method (health's Watch, reflection) is neither timed nor counted here, but
        its requests are decoded here too, so that bytes which are no message answer
        INVALID_ARGUMENT rather than grpc's UNKNOWN with a traceback at ERROR."""

        async def decoded(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return decoder.decode(raw)
            except MalformedRequest as error:
                log.info("stream_request_refused", reason=error.reason)
                await context.abort_with_status(
                    status_for(error, grpc.StatusCode.INVALID_ARGUMENT, domain=self._domain)
                )
                raise  # abort_with_status raises; this only says so to the type checker

        async def decoded_stream(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for raw in raws:
                yield await decoded(raw, context)

        def with_request(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behaviour):

                async def generator(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    async for response in behaviour(await decoded(raw, context), context):
                        yield response

                return generator

            async def coroutine(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await behaviour(await decoded(raw, context), context)

            return coroutine

        def with_requests(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behaviour):

                async def generator(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    async for response in behaviour(decoded_stream(raws, context), context):
                        yield response

                return generator

            async def coroutine(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await behaviour(decoded_stream(raws, context), context)

            return coroutine

        serializer = handler.response_serializer
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(with_request(handler.unary_stream), None, serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(with_requests(handler.stream_stream), None, serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(with_requests(handler.stream_unary), None, serializer)
        return handler

    def _admit(
        self, service: str, rpc: str, decoder: RequestDecoder | None, raw: Any, metadata: Metadata
    ) -> tuple[Any, str | None]:
        """Decodes the request and lets the gate judge the caller: the request, and the subject
        whose concurrency slot the call now holds (None: no slot). A request that is not a message
        is refused after authorization, which reads what it can of it."""
        malformed: MalformedRequest | None = None
        request = raw
        if decoder is not None:
            try:
                request = decoder.decode(raw)
            except MalformedRequest as error:
                malformed, request = error, decoder.readable(error)
        principal = None
        if self._gate is not None:
            # Before the handler: authorization before existence, so a forbidden id and a
            # missing one look alike. Only the subject and roles are logged, never the token.
            try:
                principal = self._gate.admit(service, rpc, request, metadata)
            except InvalidArgument:
                if malformed is not None:
                    raise malformed from None  # what the bytes are comes first; the rule read a stand-in
                raise
            if principal is not None:
                structlog.contextvars.bind_contextvars(caller=principal.subject, roles=sorted(principal.roles))
                bind_principal(principal)
        if malformed is not None:
            raise malformed
        if principal is None:
            return request, None
        self._caller_limits.acquire(principal.subject)
        return request, principal.subject

    def _outcome(self, error: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> Outcome:
        if isinstance(error, grpc.aio.AbortError):
            return Outcome(context.code() or grpc.StatusCode.UNKNOWN)
        if isinstance(error, DomainError):
            code = self._code_for(error)
            return Outcome(code, error.reason, status_for(error, code, domain=self._domain))
        if isinstance(error, TimeoutError):
            remaining_s = remaining_budget_s()
            if remaining_s is not None and remaining_s > TIMEOUT_SLACK_S:
                # A database command timed out while the call still had time: a slow dependency.
                return self._render(
                    grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_TIMEOUT", "a dependency timed out; retry later"
                )
            return self._render(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the call ran out of time")
        if isinstance(error, DATABASE_UNAVAILABLE_ERRORS):
            log.warning("database_unavailable", error=repr(error))
            return self._render(
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                "the database is unavailable; retry later",
            )
        log.exception("rpc_internal_error")
        return self._render(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")

    def _render(self, code: grpc.StatusCode, reason: str, message: str) -> Outcome:
        return Outcome(code, reason, rich_status(code, reason, message, domain=self._domain))

    def _code_for(self, error: DomainError) -> grpc.StatusCode:
        return code_for(error, self._error_codes)

    def _finish(self, service: str, rpc: str, outcome: Outcome, duration_s: float) -> None:
        duration_ms = round(duration_s * 1000, 2)
        code_name = outcome.code.name
        if outcome.code in (grpc.StatusCode.OK,):
            log.info("rpc_finished", grpc_code=code_name, duration_ms=duration_ms)
        elif outcome.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.error("rpc_finished", grpc_code=code_name, reason=outcome.reason, duration_ms=duration_ms)
        else:
            log.info("rpc_finished", grpc_code=code_name, reason=outcome.reason, duration_ms=duration_ms)
        for observer in self._observers:
            observer(service, rpc, outcome.code, outcome.reason, duration_s)
        structlog.contextvars.clear_contextvars()


def _incoming_request_id(metadata: Metadata) -> str:
    """The caller's request id if it is at most 128 printable ASCII characters, else a new one
    (grpcio hands over a value that is not UTF-8 read as Latin-1: such a one is not kept)."""
    for key, value in metadata:
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            cleaned = value.strip()
            if cleaned and len(cleaned) <= MAX_REQUEST_ID_HEADER_LENGTH and cleaned.isascii() and cleaned.isprintable():
                return cleaned
    return uuid.uuid4().hex


def _budget_s(context: grpc.aio.ServicerContext[Any, Any], default_s: float) -> float:
    remaining = context.time_remaining()
    return default_s if remaining is None else max(0.0, remaining)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call made while serving an RPC: the request id. (The trace, when
    tracing is on, is written by OpenTelemetry's client interceptor on the channel.)"""
    request_id = _request_id.get()
    return () if request_id is None else ((REQUEST_ID_HEADER, request_id),)


# The codes that are the server's failure, not the caller's (OpenTelemetry's semantic conventions
# for gRPC server spans): only these mark a span as an error.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _record_on_span(outcome: Outcome, request_id: str) -> None:
    """The call's outcome on the active (server) span. OpenTelemetry's interceptor cannot see a
    status sent with `abort_with_status`, which is how every refusal here is sent."""
    from opentelemetry import trace  # noqa: PLC0415  # imported only when tracing is on
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", outcome.code.value[0])
    span.set_attribute("request.id", request_id)
    if outcome.reason is not None:
        span.set_attribute("rpc.grpc.error_reason", outcome.reason)
    if outcome.code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, outcome.reason or outcome.code.name))
