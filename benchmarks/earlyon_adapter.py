"""``earlyon`` 0.3.0 (PyPI) on the very backbone weights our gates use, with its own training and calibration.

Why this way: a peer comparison is only fair at equal backbone. timm's ResNets and
torchvision's share state-dict keys, so the trained timm weights load into earlyon's
torchvision ResNet (``resnet18_ee`` / ``resnet50_ee``) once ``conv1`` takes one channel.
earlyon then does what it does itself: its exit heads (pool, MLP) trained by
``stage2_train_exits`` (frozen backbone), its greedy grid calibration
``calibrate_thresholds`` to an accuracy-drop budget on our validation split, and its
routing rule (first enabled exit whose max-softmax clears its threshold).

What we do not take from it: its FLOPs figure. earlyon's ``flops_estimate`` is an fvcore
fraction of the backbone that leaves the heads out; we count its exits like ours, with
``FlopCounterMode`` (2 FLOPs per multiply-add), every enabled head passed included.

Install: ``.venv/bin/pip install -e '.[bench]'`` (or ``pip install earlyon==0.3.0``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from timm_dgate.core.costs import GateCosts, measure_costs

INSTALL = "earlyon is not installed: `.venv/bin/pip install -e '.[bench]'` (or `pip install earlyon==0.3.0`)"
SUPPORTED = ("resnet18", "resnet50")


def available() -> bool:
    """Whether earlyon can be imported: it is an optional extra, needed only for the ResNet comparison."""
    try:
        import earlyon  # noqa: F401
    except ImportError:
        return False
    return True


def build(timm_model: nn.Module, arch: str, input_size: Sequence[int]) -> nn.Module:
    """earlyon's wrapper for ``arch`` holding ``timm_model``'s trained weights (strict load, checked)."""
    from earlyon.models.resnet_ee import resnet18_ee, resnet50_ee

    factories = {"resnet18": resnet18_ee, "resnet50": resnet50_ee}
    if arch not in factories:
        raise ValueError(f"earlyon ships ResNet factories for {SUPPORTED}, not {arch}")
    wrapper = factories[arch](timm_model.num_classes, pretrained=False)
    conv = wrapper.backbone.conv1
    wrapper.backbone.conv1 = nn.Conv2d(
        input_size[0], conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
    )
    wrapper.backbone.load_state_dict(timm_model.state_dict(), strict=True)
    # earlyon's lazy FLOPs probe (fvcore) assumes 3x224x224 unless told; give it the real input
    wrapper._input_shape = (1, *input_size)
    wrapper.eval()
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(wrapper.backbone(x), timm_model(x), atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"torchvision {arch} with the timm weights does not reproduce the timm logits")
    return wrapper


def train_heads(wrapper: nn.Module, loader: Iterable, epochs: int) -> tuple[float, list[dict[str, float]]]:
    """earlyon's stage 2 (frozen backbone, weighted multi-exit CE, Adam 1e-3): seconds, per-epoch train accuracy."""
    from earlyon.training.two_stage_trainer import stage2_train_exits

    history: list[dict[str, float]] = []

    def log(entry: object) -> None:
        history.append(dict(entry.per_exit_accuracy))
        accs = ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry.per_exit_accuracy.items())
        print(f"  earlyon heads epoch {entry.epoch + 1}/{epochs}: {accs}", flush=True)

    start = time.perf_counter()
    stage2_train_exits(wrapper, loader, epochs=epochs, on_epoch_end=log)
    wrapper.eval()
    return time.perf_counter() - start, history


def costs(wrapper: nn.Module, input_size: Sequence[int]) -> GateCosts:
    """FlopCounterMode costs of earlyon's exits: backbone up to each exit layer, and each head."""
    layers = [ep.layer_name for ep in wrapper.config.exit_points]
    heads = [wrapper.exit_heads[ep.name] for ep in wrapper.config.exit_points]
    return measure_costs(wrapper.backbone, layers, heads, input_size)


def collect(wrapper: nn.Module, loader: Iterable) -> object:
    """Every head's logits on ``loader`` (earlyon's own one-pass cache)."""
    from earlyon.core.thresholds import collect_head_logits

    return collect_head_logits(wrapper, loader, "cpu")


def calibrate(wrapper: nn.Module, val_loader: Iterable, max_drop: float) -> dict:
    """earlyon's own calibration to ``max_drop`` below the plain validation accuracy; the policy it chose."""
    from earlyon.core.thresholds import calibrate_thresholds

    result = calibrate_thresholds(wrapper, val_loader, target_accuracy_drop=max_drop)
    return {
        "thresholds": list(result.thresholds),
        "enabled": list(result.enabled_exits),
        "val_accuracy": result.final_accuracy,
        "val_plain_accuracy": result.baseline_accuracy,
        "earlyon_estimated_fraction": result.avg_computation_used,
    }


def apply(wrapper: nn.Module, policy: dict) -> None:
    """Make ``policy`` earlyon's live routing (its thresholds and enabled exits live on the wrapper's config)."""
    wrapper.config.confidence_thresholds = list(policy["thresholds"])
    wrapper.config.enabled_exits = list(policy["enabled"])


def score(wrapper: nn.Module, logits: object, exit_costs: GateCosts, policy: dict) -> tuple[float, float, list[float]]:
    """Accuracy, average GFLOPs (our count) and exit fractions of ``policy`` on cached head logits.

    Routing comes from earlyon's ``simulate_policy`` (its tested replay of the router).
    """
    from earlyon.core.thresholds import simulate_policy
    from earlyon.core.types import exit_label

    apply(wrapper, policy)
    result = simulate_policy(logits, wrapper)
    n = exit_costs.num_gates
    fractions = [result.exit_distribution.get(exit_label(i), 0.0) for i in range(n)]
    fractions.append(result.exit_distribution.get(exit_label(-1), 0.0))
    per_exit = exit_costs.exit_costs(policy["enabled"])
    gflops = sum(f * c for f, c in zip(fractions, per_exit.tolist())) / 1e9
    return result.accuracy, gflops, fractions


def runner(wrapper: nn.Module, batched: bool) -> Callable[[torch.Tensor], object]:
    """A callable for timing: earlyon's per-sample router at batch 1, its all-or-nothing batched one above."""

    def run(x: torch.Tensor) -> object:
        return wrapper.forward_inference_batched(x) if batched else wrapper(x, mode="inference")

    return run
