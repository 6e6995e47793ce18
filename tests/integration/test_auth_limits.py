"""The bound on concurrent calls per caller: past it, RESOURCE_EXHAUSTED with a reason, while
other callers still get in. A real aio server with the real interceptor and a handler that
waits until the test lets it answer."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from credit.v1 import credit_pb2
from credit_service.servicer import ACCESS_RULES, ERROR_CODES, SERVICE_NAME
from service_kit.auth import CLIENT, AuthSettings, Gate
from service_kit.errors import error_details
from service_kit.interceptor import ServerInterceptor
from tests.support.auth import auth_environment, bearer, token


async def test_a_caller_past_its_bound_is_refused_and_others_are_not() -> None:
    release = asyncio.Event()
    entered = asyncio.Queue[str]()

    async def get_balance(
        request: credit_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> credit_pb2.GetBalanceResponse:
        await entered.put(request.owner_id)
        await release.wait()
        return credit_pb2.GetBalanceResponse()

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "GetBalance": grpc.unary_unary_rpc_method_handler(
                get_balance,
                request_deserializer=credit_pb2.GetBalanceRequest.FromString,
                response_serializer=credit_pb2.GetBalanceResponse.SerializeToString,
            )
        },
    )
    gate = Gate(AuthSettings.from_environment(auth_environment()), SERVICE_NAME, ACCESS_RULES)
    interceptor = ServerInterceptor(
        domain=SERVICE_NAME, error_codes=ERROR_CODES, default_deadline_s=10, gate=gate, max_concurrent_rpcs_per_caller=1
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE_NAME}/GetBalance",
                request_serializer=credit_pb2.GetBalanceRequest.SerializeToString,
                response_deserializer=credit_pb2.GetBalanceResponse.FromString,
            )

            def balance(owner: str) -> grpc.aio.UnaryUnaryCall[Any, credit_pb2.GetBalanceResponse]:
                request = credit_pb2.GetBalanceRequest(owner_id=owner)
                return call(request, metadata=bearer(token(owner, [CLIENT])), timeout=10)

            in_flight = asyncio.ensure_future(balance(first))
            assert await asyncio.wait_for(entered.get(), 5) == first
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await balance(first)
            other = asyncio.ensure_future(balance(second))
            assert await asyncio.wait_for(entered.get(), 5) == second
            release.set()
            await in_flight
            await other
            await balance(first)  # the slot is free again
    finally:
        await server.stop(0)

    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "TOO_MANY_CONCURRENT_REQUESTS"
