"""An async client per service: the generated stub on a channel set up the way the services
expect to be called.

- Deadlines by default: every call has one (`timeout_s`, 10 s unless given), so a caller never
  waits forever on a service that does not answer.
- Retries by the gRPC service config, not by a loop here: idempotent calls (reads, and
  mutations keyed by a request_id or idempotent by design) are retried on UNAVAILABLE, with
  backoff, and wait for a connection instead of failing while a service restarts. A retry sends
  the same message and metadata again, so the same request_id and x-request-id: the service
  answers it as the first attempt would have been answered.
- A request whose `request_id` is empty gets a new one before the first attempt (in the message
  itself, so the caller can read it back and retry later with the same id).
- A token on every call from a pluggable `TokenProvider`.
- A refusal is raised as a typed exception (`therapy_booking_client.errors`).

The RPCs are the stub's, with its names and types (`await client.CreateBooking(request)`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import grpc

from booking.v1 import booking_pb2_grpc
from credit.v1 import credit_pb2_grpc
from therapy_booking_client.errors import refusal_from

if TYPE_CHECKING:
    from booking.v1.booking_pb2_grpc import BookingServiceAsyncStub
    from credit.v1.credit_pb2_grpc import CreditServiceAsyncStub
else:
    BookingServiceAsyncStub = CreditServiceAsyncStub = object

DEFAULT_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "x-request-id"
# gRPC's own bound is 5 attempts; the backoff between them is random up to the current bound.
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


class TokenProvider(Protocol):
    """Where the bearer token of each call comes from (minted, fetched from an identity provider,
    refreshed before it expires: the provider's business). Called once per call."""

    async def token(self) -> str: ...


class StaticToken:
    """One token for every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token


def service_config(service: str, idempotent: Iterable[str], timeout_s: float) -> str:
    """The channel's gRPC service config: retries and waiting for a connection for the idempotent
    methods, a default deadline for all."""
    timeout = f"{timeout_s:g}s"
    retried = [{"service": service, "method": method} for method in sorted(idempotent)]
    return json.dumps(
        {
            "methodConfig": [
                {"name": retried, "retryPolicy": RETRY_POLICY, "waitForReady": True, "timeout": timeout},
                {"name": [{"service": service}], "timeout": timeout},
            ]
        }
    )


class _ServiceClient:
    SERVICE: ClassVar[str]
    STUB: ClassVar[Any]  # the generated stub class
    # Safe to send twice: reads, request_id-keyed mutations, and replacements.
    IDEMPOTENT: ClassVar[frozenset[str]]

    def __init__(
        self, channel: grpc.aio.Channel, *, tokens: TokenProvider | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """A client on a channel of your own; `connect` makes one with the service config."""
        assert timeout_s > 0
        self._channel = channel
        self._stub = type(self).STUB(channel)
        self._tokens = tokens
        self._timeout_s = timeout_s
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        tokens: TokenProvider | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Self:
        """A client of the service at `target` (host:port; TLS with `credentials`)."""
        channel_options = [
            ("grpc.service_config", service_config(cls.SERVICE, cls.IDEMPOTENT, timeout_s)),
            # Only this config: none from DNS TXT records.
            ("grpc.service_config_disable_resolution", 1),
            ("grpc.enable_retries", 1),
            *options,
        ]
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        return cls(channel, tokens=tokens, timeout_s=timeout_s)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        method = self._methods.get(name)
        if method is None:
            method = self._wrap(getattr(self._stub, name))
            self._methods[name] = method
        return method

    def _wrap(self, multicallable: Any) -> Callable[..., Awaitable[Any]]:
        # `timeout` as gRPC's own stubs name it: the client's calls take the stub's arguments.
        async def call(
            request: Any,
            *,
            timeout: float | None = None,  # noqa: ASYNC109
            metadata: Sequence[tuple[str, str]] = (),
        ) -> Any:
            request_id = _ensure_request_id(request)
            headers = [(REQUEST_ID_HEADER, request_id or uuid.uuid4().hex), *metadata]
            if self._tokens is not None:
                headers.append(("authorization", f"Bearer {await self._tokens.token()}"))
            try:
                return await multicallable(
                    request, timeout=self._timeout_s if timeout is None else timeout, metadata=headers
                )
            except grpc.aio.AioRpcError as error:
                raise refusal_from(error) from None

        return call


def _ensure_request_id(request: Any) -> str | None:
    """The request's request_id, set to a new UUID first when the message has one and it is empty."""
    if "request_id" not in type(request).DESCRIPTOR.fields_by_name:
        return None
    if not request.request_id:
        request.request_id = str(uuid.uuid4())
    value: str = request.request_id
    return value


class BookingClient(_ServiceClient, BookingServiceAsyncStub):
    """booking.v1.BookingService."""

    SERVICE = "booking.v1.BookingService"
    STUB = booking_pb2_grpc.BookingServiceStub
    IDEMPOTENT = frozenset(
        {
            "CreateTherapist",
            "GetTherapist",
            "UpdateTherapist",
            "SetWeeklySchedule",
            "SetDateOverride",
            "DeleteDateOverride",
            "GetSchedule",
            "CreateSessionType",
            "ListSessionTypes",
            "ListAvailableSlots",
            "CreateBooking",
            "GetBooking",
            "ListBookings",
            "CancelBooking",
            "RescheduleBooking",
            "ListDeadLetters",
            "ListTherapists",
            "SearchAvailability",
            "ArchiveTherapist",
            "UnarchiveTherapist",
            "UpdateSessionType",
            "RetireSessionType",
            "CreateWebhookEndpoint",
            "GetWebhookEndpoint",
            "ListWebhookEndpoints",
            "UpdateWebhookEndpoint",
            "DisableWebhookEndpoint",
            "EnableWebhookEndpoint",
            "ListWebhookAttempts",
            "ListWebhookDeliveries",
        }
    )


class CreditClient(_ServiceClient, CreditServiceAsyncStub):
    """credit.v1.CreditService (its reservation RPCs are the booking service's to call)."""

    SERVICE = "credit.v1.CreditService"
    STUB = credit_pb2_grpc.CreditServiceStub
    IDEMPOTENT = frozenset(
        {
            "GrantCredits",
            "GetBalance",
            "ReserveCredits",
            "CommitReservation",
            "BatchReserveCredits",
            "BatchCommitReservations",
            "CancelReservation",
            "RefundReservation",
            "GetReservation",
            "ListReservations",
            "ListLedgerEntries",
        }
    )
