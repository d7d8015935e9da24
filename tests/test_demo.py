"""The demo pipeline, end to end on a small slice of the real Fashion-MNIST."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import timm_dgate
from timm_dgate.demo.backbone import accuracy, cached_backbone
from timm_dgate.demo.pipeline import DEMO_KINDS, DROPS, DemoConfig, run_demo
from timm_dgate.fashion_mnist import load_splits
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND
from timm_dgate.reports import accuracy_at


def test_demo_runs_end_to_end_reuses_its_backbone_and_publishes_what_plain_timm_reads(tmp_path, capsys):
    # a tiny timm model stands in for resnet18: trained the same way, long enough to be far above chance
    cfg = DemoConfig(output=str(tmp_path), model="test_resnet", limit=1000, val_size=400, backbone_epochs=8,
                     gate_epochs=20, timing_images=64, timing_repeats=1)
    results = run_demo(cfg)
    captured = capsys.readouterr()
    printed = captured.out
    assert "Backbone: training" in printed and "| profile | thresholds | test accuracy" in printed
    log = (captured.out + captured.err).splitlines()  # not a terminal: progress is one line per phase
    assert len(log) < 200, f"{len(log)} lines of output"
    assert printed.splitlines()[-1].endswith(f"Everything in one page: {tmp_path / 'report.html'}")
    for name in ("tradeoff.png", "exits_per_class.png", "results.json", "report.md", "report.html",
                 "backbone/model.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    page = (tmp_path / "report.html").read_text()
    # one evaluation table per gate kind, exits per class, accuracy at equal compute; both plots
    assert page.count("<table>") == len(DEMO_KINDS) + 2 and page.count('src="data:image/png;base64,') == 2
    hinge = results["reports"]["hinge"]
    assert hinge["split"] == "test" and hinge["num_images"] == 1000 and hinge["plain_accuracy"] > 0.5
    assert [p["name"] for p in hinge["profiles"]] == [f"hinge/margin {label}" for label in DROPS]
    assert len(results["reports"]["ce"]["profiles"]) == 2 * len(DROPS)  # softmax and entropy exits
    for profile in hinge["profiles"]:
        assert 0 <= profile["flops_reduction"] < 1 and sum(profile["exit_fractions"]) > 0.999
    assert json.loads((tmp_path / "results.json").read_text())["gates"] == ["layer1", "layer2", "layer3"]
    published = timm_dgate.from_pretrained(tmp_path / "hub")  # the default kind's gates
    assert list(published.profiles) == [p["name"] for p in results["reports"][DEFAULT_GATE_KIND]["profiles"]]
    assert all(p.split == "validation" and p.test["split"] == "test" for p in published.profiles.values())

    splits = load_splits(val_size=cfg.val_size, seed=cfg.seed, limit=cfg.limit)
    again = cached_backbone(cfg.model, splits.train, tmp_path / "backbone")  # what a rerun of the demo does
    assert "trained earlier from" in capsys.readouterr().out
    assert accuracy(again, splits.test) == hinge["plain_accuracy"]  # the whole backbone came back, head included
    with pytest.raises(ValueError, match="holds a trained test_resnet, not resnet50: pass --retrain"):
        cached_backbone("resnet50", splits.train, tmp_path / "backbone")

    # the Hub folder in plain timm, preprocessing raw images as its config says: the demo's plain accuracy
    plain = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=plain), is_training=False)
    images, labels = splits.test.tensors
    with torch.no_grad():
        logits = plain(torch.stack([transform(Image.fromarray(image[0].numpy(), mode="L")) for image in images]))
    assert (logits.argmax(1) == labels).double().mean().item() == pytest.approx(hinge["plain_accuracy"], abs=0.003)


def test_curves_compare_at_equal_compute_by_interpolation():
    curve = [(0.80, 1.0), (0.90, 2.0), (0.92, 4.0)]
    assert accuracy_at(curve, 1.5) == pytest.approx(0.85) and accuracy_at(curve, 4.0) == 0.92
    assert accuracy_at(curve, 0.5) is None and accuracy_at(curve, 4.5) is None  # never extrapolated
