"""The app ``kmrun serve`` runs: MLflow's scoring server, whose error replies keep their
message and drop the server's stack trace (its paths and code are not the caller's
business). Imported by uvicorn in the server process, with the model's folder in
MLflow's ``_SERVER_MODEL_PATH`` variable."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from mlflow.pyfunc.scoring_server.app import app  # loads the model
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["app"]


@app.middleware("http")
async def _without_stack_trace(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        reply.pop("stack_trace", None)
        body = json.dumps(reply).encode()
    return Response(body, status_code=response.status_code, media_type="application/json")
