"""What fitting many gates costs: one backbone pass caches every gate's features, then the gates train on it.

Why: block-level placement puts a gate at every block end (16 on a ResNet-50) and lets
calibration keep the ones that pay, which is only sensible if fitting 16 gates costs about
what fitting 3 does. Random backbone weights are enough: the cost does not depend on them.
Stage-level gates are measured first, block-level second, in one process; peak memory is the
growth of ``ru_maxrss`` (a high-water mark) over each phase.

    nice -n 10 .venv/bin/python benchmarks/speed/fit_many_gates.py --model resnet50 --images 3000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import timm
import torch

from timm_dgate import cache_features, fit, wrap
from timm_dgate.fashion_mnist import TensorBatches, load_splits
from timm_dgate.fitting.training import DEFAULT_EPOCHS


def maxrss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: torch.nn.Module, gates: str | None, loader: TensorBatches, size: int, epochs: int) -> dict:
    """Cache and fit one placement: seconds, cache size and peak-memory growth of each phase."""
    gated = wrap(model, gates=gates, input_size=(1, size, size))
    row: dict[str, object] = {"placement": gates or "stages (default)", "gates": gated.num_gates,
                              "gate_features": sum(b.num_chs for b in gated.boundaries)}
    start, before = time.perf_counter(), maxrss_mib()
    cache = cache_features(gated, loader, progress=False)
    row |= {"cache_s": time.perf_counter() - start, "cache_peak_growth_mib": maxrss_mib() - before,
            "cache_mib": sum(f.numel() * f.element_size() for f in cache.features) / 2**20}
    start, before = time.perf_counter(), maxrss_mib()
    fit(gated, cache, epochs=epochs, progress=False)
    row |= {"fit_s": time.perf_counter() - start, "fit_peak_growth_mib": maxrss_mib() - before}
    gated.unwrap()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=3000, help="Fashion-MNIST training images")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the cache, as fit's default")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10).eval()
    loader = TensorBatches(load_splits(limit=args.images).train, args.input_size)
    print(json.dumps({"model": args.model, "images": args.images, "threads": torch.get_num_threads(),
                      "maxrss_start_mib": maxrss_mib()}), flush=True)
    for gates in (None, "blocks"):
        print(json.dumps(measure(model, gates, loader, args.input_size, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
