"""The application's entry: HTTP requests and handle calls checked, run, answered.

``POST /`` (an image file, JSON or a ``.npy`` array; see :mod:`timm_dgate.serve.requests`) answers
``{"class", "label", "probabilities", "exit", "profile"}``, and a bad request a 400 with ``{"error": ...}``
saying what was expected, before the model sees it. ``GET /`` describes the model (input size,
profiles); ``GET /stats`` returns each model deployment's counts. From Python, the handle that
``serve.run`` returns answers ``handle.predict.remote(tensor, profile=None)`` with the same dictionary,
and raises :class:`~timm_dgate.serve.requests.BadRequest` for a bad one. Imports Ray: loaded by
``serve.app`` only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .requests import BadRequest, answer, check_tensor, parse_http, policy_for
from .spec import ModelSpec


@serve.deployment
class Ingress:
    """Checks requests against ``spec`` and sends them to ``model`` (segment 0, or the whole-model deployment);
    ``parts``: every model deployment, for ``stats``."""

    def __init__(self, spec: ModelSpec, shape: str, model: Any, parts: list[Any]):
        self.spec, self.shape, self.model, self.parts = spec, shape, model, parts

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            if request.url.path.rstrip("/").endswith("/stats"):
                return JSONResponse(await self.stats())
            return JSONResponse({**self.spec.describe(), "shape": self.shape})
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} is not served: POST an image, GET a description"},
                                status_code=405)
        try:
            x, profile = parse_http(await request.body(), request.headers.get("content-type"),
                                    request.query_params, self.spec)
            return JSONResponse(await self._predict(x, profile))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    async def predict(self, x: Any, profile: str | None = None) -> dict[str, Any]:
        """One preprocessed image ``(C, H, W)`` (or ``(1, C, H, W)``) under ``profile``: the answer."""
        return await self._predict(check_tensor(x, self.spec), profile)

    async def _predict(self, x: torch.Tensor, profile: str | None) -> dict[str, Any]:
        policy = policy_for(self.spec, profile)
        logits, exit_index = await self.model.remote(x, policy)
        return answer(logits, exit_index, policy, self.spec)

    async def stats(self) -> dict[str, Any]:
        """Each model deployment's counts (one replica's each): exits, batch sizes, queue waits."""
        parts = await asyncio.gather(*(part.stats.remote() for part in self.parts))
        return {"shape": self.shape, "deployments": list(parts)}
