"""Serving a gated model, a cascade or an export on Ray Serve (``pip install 'timm-dgate[serve]'``).

``build_app(folder, shape="segments" | "whole" | "plain", ...)`` returns an application for
``ray.serve.run``; ``start(folder, port=...)`` builds and runs it; ``timm-dgate serve FOLDER`` does
the same from the command line. The package is the one public entry of the folder: its modules are
``app`` (the builders), ``segments`` and ``whole`` (the model deployments), ``ingress`` (HTTP and
handle calls), ``requests`` (parsing and answers), ``runners`` (the work in a replica, without Ray),
``metrics`` and ``spec``. Ray is imported only when an application is built.
"""

from .app import SHAPES, build_app, start
from .requests import BadRequest

__all__ = ["SHAPES", "BadRequest", "build_app", "start"]
