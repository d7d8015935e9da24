"""Requests in, answers out: what the ingress accepts, what it refuses (a 400 saying why), what it returns.

A request is one image, sent as

- an image file (PNG, JPEG, anything Pillow reads) as the body, preprocessed with the model's timm data
  config (the folder's ``pretrained_cfg``);
- JSON ``{"tensor": [...]}`` (nested lists of shape ``(C, H, W)`` or ``(1, C, H, W)``, already preprocessed)
  or ``{"image": "<base64 of an image file>"}``;
- a NumPy ``.npy`` array of the input's shape (``Content-Type: application/x-npy``);

with the profile in the query (``?profile=fast``) or the JSON (``"profile": "fast"``); none: the policy in
force when the application was built. Nothing here imports Ray: the same checks serve HTTP and handle calls.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from typing import Any

import torch

from ..core.policy import ExitPolicy
from .spec import ModelSpec

NPY_TYPES = ("application/x-npy", "application/npy")


class BadRequest(ValueError):
    """A request the model cannot answer as sent; the message says what was expected (HTTP 400)."""


def policy_for(spec: ModelSpec, profile: str | None) -> ExitPolicy:
    """The policy a request asked for: a stored profile by name, or the one in force (``None``)."""
    if profile is None or profile == "":
        return spec.active
    if not isinstance(profile, str):
        raise BadRequest(f"profile must be a profile's name, got {type(profile).__name__}")
    if profile not in spec.profiles:
        known = ", ".join(repr(p) for p in spec.profiles) or "none (it serves without exit profiles)"
        raise BadRequest(f"unknown profile {profile!r}; this model's profiles: {known}")
    return spec.profiles[profile]


def expected_shape(spec: ModelSpec) -> str:
    shape = ", ".join(map(str, spec.input_size))
    return f"a tensor of shape ({shape}) or (1, {shape})"


def check_tensor(x: Any, spec: ModelSpec) -> torch.Tensor:
    """One preprocessed image as a float tensor ``(C, H, W)`` on the CPU; a wrong type or shape is a
    :class:`BadRequest` naming the expected shape."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise BadRequest(f"expected {expected_shape(spec)} of numbers: {error}") from None
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise BadRequest(f"expected {expected_shape(spec)} of real numbers, got {x.dtype}")
    if x.ndim == len(spec.input_size) + 1 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != spec.input_size:
        raise BadRequest(f"expected {expected_shape(spec)}, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise BadRequest("the tensor holds NaN or infinite values")
    return x.detach().to("cpu", torch.float32).contiguous()


def decode_image(data: bytes, spec: ModelSpec) -> torch.Tensor:
    """An image file -> the model's input ``(C, H, W)``, as timm's eval transform of the folder's data config."""
    if spec.data_config is None:
        raise BadRequest(
            "this model records no image preprocessing (an exported folder): send "
            f"{expected_shape(spec)}, or build the application with data_config=(mean, std, ...)"
        )
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadRequest(
            f"could not decode the body as an image ({error}); send an image file (PNG, JPEG, ...), JSON "
            f'{{"tensor": ...}} with {expected_shape(spec)}, or a .npy array as application/x-npy'
        ) from None
    image = image.convert("L" if spec.input_size[0] == 1 else "RGB")
    transform = create_transform(**{k: v for k, v in spec.data_config.items() if k != "test_input_size"})
    return check_tensor(transform(image), spec)


def _decode_npy(data: bytes, spec: ModelSpec) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadRequest(f"could not read the body as a .npy array ({error}); expected {expected_shape(spec)}"
                         ) from None
    return check_tensor(torch.from_numpy(np.array(array, dtype=np.float32)), spec)


def _decode_json(data: bytes, spec: ModelSpec) -> tuple[torch.Tensor, str | None]:
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the body is not valid JSON ({error})") from None
    if not isinstance(body, dict) or ("tensor" in body) == ("image" in body):
        raise BadRequest('expected a JSON object with one of "tensor" (nested lists) or "image" (base64 of an '
                         'image file), and optionally "profile"')
    profile = body.get("profile")
    if "tensor" in body:
        return check_tensor(body["tensor"], spec), profile
    if not isinstance(body["image"], str):
        raise BadRequest('"image" must be a base64 string of an image file')
    try:
        image = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequest(f'"image" is not valid base64 ({error})') from None
    return decode_image(image, spec), profile


def parse_http(body: bytes, content_type: str | None, query: Mapping[str, str], spec: ModelSpec) -> tuple[
    torch.Tensor, str | None
]:
    """An HTTP request's image or tensor and the profile it asks for; :class:`BadRequest` when it cannot work."""
    media = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise BadRequest(f"empty body: send an image file, JSON {{\"tensor\": ...}} with {expected_shape(spec)}, "
                         "or a .npy array")
    if media == "application/json":
        x, profile = _decode_json(body, spec)
    elif media in NPY_TYPES:
        x, profile = _decode_npy(body, spec), None
    else:
        x, profile = decode_image(body, spec), None
    return x, query.get("profile", profile)


def answer(logits: torch.Tensor, exit_index: int, policy: ExitPolicy | None, spec: ModelSpec) -> dict[str, Any]:
    """The response to one request: the class, the probabilities (softmax of the logits it left with), the exit
    taken (``num_gates``: the head) and the profile used (``None``: thresholds set by hand, or the plain model)."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    label = int(probabilities.argmax())
    return {
        "class": label,
        "label": spec.label_names[label] if spec.label_names else None,
        "probabilities": probabilities.tolist(),
        "exit": int(exit_index),
        "profile": policy.profile if policy is not None else None,
    }
