"""The student endpoint's HTTP layer (no Ray): FastAPI app factory, request/response models, backend.

    app = create_app(EpisodeBackend(engine, tools=...), cfg.serve, cfg.agent)

`raydistill.stages.serve` mounts the same app as a Ray Serve ingress over engine/sandbox/retriever deployments.
"""

from raydistill.serving.app import SolveBackend, create_app, resolve_api_key
from raydistill.serving.backend import EpisodeBackend
from raydistill.serving.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    SagParams,
    SolveRequest,
    SolveResponse,
)

__all__ = [
    "ChatCompletionRequest", "ChatCompletionResponse", "EpisodeBackend", "SagParams", "SolveBackend",
    "SolveRequest", "SolveResponse", "create_app", "resolve_api_key",
]
