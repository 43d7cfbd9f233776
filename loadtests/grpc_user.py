"""gRPC scenario: a Locust user calling ledger_svc directly (internal services' traffic),
each call reported to Locust's statistics as request type "grpc"."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, task

from loadtests.rest import _loopback_only, hot_member  # noqa: F401  (the loopback guard registers)
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

grpc_gevent.init_gevent()  # grpc's own threads must cooperate with Locust's gevent loop


class LedgerCaller(User):
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(os.environ["LOADTEST_LEDGER_ADDR"])
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, method: Any, request: Any) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            method(request, timeout=5)
        except grpc.RpcError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=error, context={},
        )  # fmt: skip

    @task(3)
    def earn(self) -> None:
        key = common_pb2.IdempotencyKey(namespace="loadtest", key=uuid.uuid4().hex)
        self._call(
            "Earn", self.stub.Earn, ledger_pb2.EarnRequest(idempotency_key=key, member_id=hot_member(), points=5)
        )

    @task(5)
    def balance(self) -> None:
        self._call("GetBalance", self.stub.GetBalance, ledger_pb2.GetBalanceRequest(member_id=hot_member()))
