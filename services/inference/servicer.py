"""gRPC surface of the inference service: validate, translate, call :class:`InferenceCore`.

Generate streams ``delta`` messages, then one ``result``. When the client
cancels or its deadline passes, grpc.aio cancels the handler; the engine stream
is closed on the way out (``aclosing``), which drops the provider connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.chat import (
    finish_to_proto,
    messages_from_proto,
    params_from_proto,
    usage_to_proto,
    validate_messages,
    validate_params,
)
from libs.deadlines import Deadline
from libs.errors import Violations
from libs.grpc_server import ServiceBinding
from libs.validation import check_token
from services.inference.core import InferenceCore
from services.inference.settings import InferenceSettings

SERVICE_NAME = "tollgate.inference.v1.InferenceService"
# The request id is forwarded to providers as the x-request-id header: ASCII only, bounded.
MAX_REQUEST_ID_CHARS = 128
MAX_MODEL_NAME_CHARS = 128


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore, settings: InferenceSettings):
        self._core = core
        self._settings = settings

    def binding(self) -> ServiceBinding:
        return ServiceBinding(SERVICE_NAME,
                              lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server))

    def _check_model(self, model: str, violations: Violations) -> None:
        if not model:
            violations.add("model", "model is required")
        elif len(model) > MAX_MODEL_NAME_CHARS:
            violations.add("model", f"at most {MAX_MODEL_NAME_CHARS} characters")
        elif self._core.model(model) is None:
            served = ", ".join(m.name for m in self._core.models())
            violations.add("model", f"model {model[:100]!r} is not served by this instance (serves: {served})")

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        violations = Violations()
        check_token(violations, request.request_id, "request_id", max_chars=MAX_REQUEST_ID_CHARS)
        self._check_model(request.model, violations)
        validate_messages(request.messages, violations)
        validate_params(request.params, violations, max_output_tokens=self._settings.max_output_tokens)
        violations.raise_if_any()

        deadline = Deadline.from_remaining(context.time_remaining(), default_s=self._settings.default_timeout_s,
                                           max_s=self._settings.max_timeout_s)
        request_id = request.request_id or uuid.uuid4().hex
        stream = self._core.generate(request_id, request.model, messages_from_proto(request.messages),
                                     params_from_proto(request.params), deadline)
        try:
            async for chunk in stream:
                if chunk.delta or chunk.output_tokens:  # an end-of-sequence token has no text but is billed
                    yield inference_pb2.GenerateResponse(delta=chunk.delta, delta_output_tokens=chunk.output_tokens)
                if chunk.usage is not None or chunk.finish_reason is not None:
                    yield inference_pb2.GenerateResponse(result=inference_pb2.GenerationResult(
                        usage=usage_to_proto(chunk.usage) if chunk.usage else common_pb2.TokenUsage(),
                        finish_reason=finish_to_proto(chunk.finish_reason),
                        model=chunk.model,
                        provider=chunk.provider,
                    ))
        finally:
            await stream.aclose()

    async def CountTokens(self, request: inference_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> inference_pb2.CountTokensResponse:
        violations = Violations()
        self._check_model(request.model, violations)
        validate_messages(request.messages, violations)
        violations.raise_if_any()
        count = await self._core.count_tokens(request.model, messages_from_proto(request.messages))
        return inference_pb2.CountTokensResponse(input_tokens=count)

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=[
            inference_pb2.ServedModel(name=m.name, provider=m.provider, context_window=m.context_window)
            for m in self._core.models()
        ])

    async def GetLoad(self, request: inference_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> inference_pb2.GetLoadResponse:
        load = self._core.load()
        return inference_pb2.GetLoadResponse(running_requests=load.running, waiting_requests=load.waiting,
                                             kv_cache_usage=load.kv_cache_usage,
                                             max_waiting_requests=load.max_waiting)
