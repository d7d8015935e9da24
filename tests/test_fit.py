"""Gate fitting: frozen backbone, repeatable, cached and streaming paths agree in spirit."""

from __future__ import annotations

import torch

from timm_dgate.cache import FeatureCache, cache_features
from timm_dgate.training import fit

from .helpers import batches, tiny_gated


def _backbone_state(gated) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gated.base_model.state_dict().items()}


def test_fit_leaves_the_backbone_bit_identical(fmnist):
    gated = tiny_gated()
    gated.base_model.train()  # even a model left in train mode must not update BatchNorm stats
    before = _backbone_state(gated)
    fit(gated, batches(fmnist.train), epochs=5, progress=False)
    fit(gated, batches(fmnist.train), epochs=1, stream=True, progress=False)
    after = gated.base_model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert not any(p.requires_grad for p in gated.base_model.parameters())
    assert not gated.base_model.training


def test_fit_trains_gates_that_beat_chance_on_real_data(fmnist):
    gated = tiny_gated()
    report = fit(gated, batches(fmnist.train), epochs=100, progress=False)
    assert report.num_samples == len(fmnist.train) and report.num_processes == 1
    assert min(report.train_accuracy) > 0.4  # 10 classes: chance is 0.1
    assert gated.exit_score == "margin" and gated.gate_loss == "hinge"
    cache = cache_features(gated, batches(fmnist.val), split="validation", progress=False)
    margins = cache.margins(gated.gates)
    assert min((m.argmax(1) == cache.labels).float().mean().item() for m in margins) > 0.4


def test_fit_is_repeatable_and_cache_equals_loader(fmnist):
    loader = batches(fmnist.train)
    a, b = tiny_gated(), tiny_gated()
    fit(a, loader, epochs=20, progress=False)
    cache = cache_features(b, loader, progress=False)
    fit(b, cache, epochs=20, progress=False)
    for ga, gb in zip(a.gates, b.gates):
        assert torch.equal(ga.fc.weight, gb.fc.weight) and torch.equal(ga.fc.bias, gb.fc.bias)


def test_cross_entropy_gates_read_softmax_scores(fmnist):
    gated = tiny_gated()
    fit(gated, batches(fmnist.train), loss="ce", epochs=30, progress=False)
    assert gated.exit_score == "softmax" and gated.gate_loss == "ce"


def test_cache_spills_to_disk_past_its_memory_bound(fmnist, tmp_path):
    gated = tiny_gated()
    loader = batches(fmnist.train)
    in_memory = cache_features(gated, loader, progress=False)
    spilled = cache_features(gated, loader, max_memory_bytes=1, spill_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()), "nothing was written to disk"
    for a, b in zip(in_memory.features, spilled.features):
        assert torch.equal(a, b)
    in_memory.save(tmp_path / "cache.safetensors")
    loaded = FeatureCache.load(tmp_path / "cache.safetensors")
    assert loaded.split == "train" and torch.equal(loaded.labels, in_memory.labels)
