"""Real gRPC servers for the end-to-end tests: grpcio servers with generic handlers and bytes serializers (no
protoc), each answering with its version's name, and the standard health service."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "demo.Echo"


class GrpcServer:
    """One version: Unary (answers "<version>:<request>"), Stream (that, `n` times, n = int(request)), Slow
    (sleeps 2 s), Trailers (custom trailing metadata) and grpc.health.v1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Trailers": grpc.unary_unary_rpc_method_handler(self._trailers),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GrpcServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(None)

    def _count(self) -> None:
        with self.lock:
            self.calls += 1

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        return f"{self.name}:".encode() + request

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        for i in range(int(request)):
            yield f"{self.name}:{i}".encode()

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        context.add_callback(self.cancelled.set)
        time.sleep(2.0)
        return b"late"

    def _trailers(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        context.set_trailing_metadata((("x-served-by", self.name), ("x-checksum-bin", b"\x00\x01")))
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b"ok"


def unary(channel: grpc.Channel, method: str = "Unary") -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def stream(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=None, response_deserializer=None)
