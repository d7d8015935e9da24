"""Ray Serve applications built from a folder: per segment, whole, or the plain model for comparison.

``build_app`` reads the folder once (to check it and to learn what requests must look like) and returns
an application for ``serve.run``; every replica loads the folder itself, so on a cluster the folder must
be readable on each node (shared storage) or be a Hub id. Ray is imported here only when an application
is built, so ``import timm_dgate.serve`` works without the ``serve`` extra.
"""

from __future__ import annotations

import os
from typing import Any

from ..deploy.stages import stages_of
from ..errors import ExportError, InputError
from .spec import folder_kind, load_model, located, plain_spec, spec_of

SHAPES = ("segments", "whole", "plain")
INSTALL = "pip install 'timm-dgate[serve]'"


def _serve_module() -> Any:
    try:
        from ray import serve
    except ImportError as error:
        raise InputError(f"serving needs Ray Serve ({error}): {INSTALL}") from None
    return serve


def build_app(
    folder: str | os.PathLike,
    *,
    shape: str = "segments",
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005,
    num_replicas: int | str = 1,
    max_ongoing_requests: int = 1024,
    ray_actor_options: dict[str, Any] | None = None,
    torch_threads: int | None = None,
    data_config: dict[str, Any] | None = None,
) -> Any:
    """A Ray Serve application serving ``folder``: a gated model's folder (``save_pretrained``), a cascade's,
    or an export (``timm_dgate.export``; its runtime runs it).

    ``shape``: ``"segments"``, one deployment per segment (a gated model or an export), or ``"whole"``, one
    deployment running the whole model (the refill executor; a cascade by profile), or ``"plain"``, the
    backbone without its exits under the same batching, to compare with. ``max_batch_size`` and
    ``batch_wait_timeout_s``: each model deployment's batching (``@serve.batch``'s, per segment).
    ``num_replicas`` (an int or ``"auto"``), ``max_ongoing_requests`` and ``ray_actor_options`` apply to each
    model deployment (default: the application reserves one CPU in all, shared by its segments); the HTTP
    ingress reserves none. ``torch_threads``: torch's threads in each model replica (default: Ray's, one per
    reserved CPU, at least one). ``data_config``: timm's preprocessing keys (``mean``, ``std``, ``crop_pct``,
    ...) for image requests, needed for an export, which records none.
    """
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if max_batch_size < 1 or batch_wait_timeout_s < 0:
        raise InputError(f"max_batch_size must be at least 1 and batch_wait_timeout_s at least 0, got "
                         f"{max_batch_size} and {batch_wait_timeout_s}")
    _serve_module()  # says how to install Ray Serve where it is missing
    from .ingress import Ingress

    path = located(folder)
    kind = folder_kind(path)
    model = load_model(path, kind)
    spec = spec_of(model, path, kind, data_config)
    batching = dict(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                    torch_threads=torch_threads)
    options: dict[str, Any] = dict(num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests)
    ingress = Ingress.options(name="ingress", max_ongoing_requests=max_ongoing_requests,
                              ray_actor_options={"num_cpus": 0})
    if shape == "segments":
        from .segments import Segment

        try:
            num_stages = stages_of(model).num_gates + 1
        except (ExportError, ValueError) as error:
            raise InputError(f"cannot serve {path} per segment: {error}; serve it with shape='whole'") from None
        actor = ray_actor_options or {"num_cpus": round(1 / num_stages, 4)}
        parts: list[Any] = []
        following = None
        for k in reversed(range(num_stages)):
            following = Segment.options(name=f"segment{k}", ray_actor_options=actor, **options).bind(
                path, kind, k, following, **batching)
            parts.insert(0, following)
        return ingress.bind(spec, shape, parts[0], parts)
    from .whole import WholeModel

    if shape == "plain":
        spec = plain_spec(spec)
    part = WholeModel.options(name="model", ray_actor_options=ray_actor_options or {"num_cpus": 1}, **options).bind(
        path, kind, shape, **batching)
    return ingress.bind(spec, shape, part, [part])


def start(
    folder: str | os.PathLike,
    *,
    name: str = "timm-dgate",
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = False,
    **build_options: Any,
) -> Any:
    """Build the application of ``folder`` (``build_options``: :func:`build_app`'s) and run it on Ray Serve,
    HTTP on ``host:port`` at ``route_prefix``; returns the ingress's handle (``blocking``: serve until
    interrupted). Connects to the Ray cluster in ``RAY_ADDRESS`` or starts a local one."""
    serve = _serve_module()
    app = build_app(folder, **build_options)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)
