"""A fake OTLP/gRPC backend for the tests of what ktel makes of its answers: send_once
calls Export on the SDK exporter's own channel, which a test replaces with ``Channel``."""

from collections.abc import Callable
from typing import Any


class Channel:
    """A gRPC channel whose calls go to ``export(request, metadata=..., timeout=...)``,
    which returns the response (None for an empty one) or raises a grpc.RpcError. The
    request reaches it and the response comes back serialised, as over the wire."""

    def __init__(self, export: Callable[..., Any]) -> None:
        self.export = export

    def unary_unary(self, method: str, request_serializer: Callable[[Any], bytes], **_kw: Any) -> Any:
        def call(request: Any, **kw: Any) -> bytes:
            answer = self.export(type(request).FromString(request_serializer(request)), **kw)
            return b"" if answer is None else answer.SerializeToString()

        return call
