"""Gate fitting: frozen backbone, repeatable, cached and streaming paths agree in spirit."""

from __future__ import annotations

import pytest
import torch

from timm_dgate.core.cache import FeatureCache, cache_features
from timm_dgate.core.losses import DEFAULT_EXIT_SCORE, cross_entropy, multiclass_hinge
from timm_dgate.fitting.training import fit

from .helpers import batches, tiny_gated

LOSSES = {"hinge": multiclass_hinge, "ce": cross_entropy}


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


@pytest.fixture(scope="module")
def caches(fmnist) -> tuple[FeatureCache, FeatureCache]:
    """Train and validation caches of ``tiny_gated()``'s backbone, shared: each test fits fresh gates on them."""
    gated = tiny_gated()
    return (cache_features(gated, batches(fmnist.train), progress=False),
            cache_features(gated, batches(fmnist.val), split="validation", progress=False))


def gate_accuracy(gated, cache: FeatureCache) -> list[float]:
    return [(m.argmax(1) == cache.labels).float().mean().item() for m in cache.margins(gated.gates)]


def test_each_gate_loss_trains_gates_that_minimise_that_loss(caches):
    """``loss="ce"`` really trains cross-entropy gates: each fit ends lower on its own loss than the other fit."""
    train, _ = caches
    scored = {}
    for loss in ("hinge", "ce"):
        gated = tiny_gated()
        fit(gated, train, loss=loss, epochs=30, progress=False)
        margins = train.margins(gated.gates)
        scored[loss] = {name: [fn(m, train.labels).item() for m in margins] for name, fn in LOSSES.items()}
        assert gated.gate_loss == loss and gated.exit_score == DEFAULT_EXIT_SCORE[loss]
    for k in range(3):
        assert scored["ce"]["ce"][k] < scored["hinge"]["ce"][k], f"gate {k}"
        assert scored["hinge"]["hinge"][k] < scored["ce"]["hinge"][k], f"gate {k}"


def test_a_larger_l2_weight_gives_smaller_gate_weights(caches):
    norms = {}
    for reg in (0.0, 0.05):
        gated = tiny_gated()
        fit(gated, caches[0], epochs=30, reg=reg, progress=False)
        norms[reg] = [g.fc.weight.norm().item() for g in gated.gates]
    assert all(strong < weak for strong, weak in zip(norms[0.05], norms[0.0])), norms


def test_streaming_fit_learns_gates_about_as_accurate_as_the_cached_fit(fmnist, caches):
    train, val = caches
    cached, streamed = tiny_gated(), tiny_gated()
    fit(cached, train, epochs=30, progress=False)
    fit(streamed, batches(fmnist.train, 100), epochs=4, stream=True, progress=False)
    for k, (c, s) in enumerate(zip(gate_accuracy(cached, val), gate_accuracy(streamed, val))):
        assert s >= c - 0.05 and s > 0.4, f"gate {k}: streamed {s:.3f}, cached {c:.3f}"


def test_cache_spills_to_disk_past_its_memory_bound(fmnist, tmp_path):
    gated = tiny_gated()
    loader = batches(fmnist.train)
    in_memory = cache_features(gated, loader, progress=False)
    spilled = cache_features(gated, loader, max_memory_bytes=1, spill_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()), "nothing was written to disk"
    for a, b in zip(in_memory.features, spilled.features):
        assert torch.equal(a, b)
    assert torch.equal(in_memory.fingerprints, spilled.fingerprints)
    in_memory.save(tmp_path / "cache.safetensors")
    loaded = FeatureCache.load(tmp_path / "cache.safetensors")
    assert loaded.split == "train" and torch.equal(loaded.labels, in_memory.labels)
    assert torch.equal(loaded.fingerprints, in_memory.fingerprints)  # a reloaded cache still knows its images


def _permuted(cache: FeatureCache, order: torch.Tensor) -> FeatureCache:
    return FeatureCache([f[order] for f in cache.features], cache.logits[order], cache.labels[order], cache.split,
                        cache.fingerprints[order])


@pytest.mark.parametrize("hidden", [0, 16])
def test_a_minibatch_fit_does_not_depend_on_which_rows_a_process_holds_or_their_order(caches, hidden):
    """Batches are sets of images, not of row numbers: shuffled rows (another shard layout) give the same gates."""
    train, val = caches
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    margins = []
    for cache in (train, _permuted(train, order)):
        gated = tiny_gated(gate_hidden=hidden)
        fit(gated, cache, loss="ce", epochs=6, batch_size=64, progress=False)
        margins.append(val.margins(gated.gates))
    for one, other in zip(*margins):  # the same steps up to float summation order (threads, row order)
        assert (one - other).abs().max() <= 1e-3 * one.abs().max()
        assert (one.argmax(1) == other.argmax(1)).float().mean() >= 0.99


def test_each_epoch_splits_the_rows_into_disjoint_batches_of_about_equal_size_and_reshuffles(caches):
    from timm_dgate.fitting.minibatches import epoch_batches

    keys = caches[0].fingerprints
    epochs = [epoch_batches(keys, epoch, num_batches=8) for epoch in range(2)]
    for batches_ in epochs:
        rows = torch.cat(batches_).sort().values
        assert torch.equal(rows, torch.arange(len(keys)))  # every row once
        sizes = torch.tensor([len(b) for b in batches_], dtype=torch.float)
        assert sizes.min() > 0.6 * len(keys) / 8 and sizes.max() < 1.4 * len(keys) / 8
    first = {int(r) for r in epochs[0][0]}
    assert len(first & {int(r) for r in epochs[1][0]}) < 0.5 * len(first)  # a new draw each epoch


def test_minibatch_steps_reach_gates_at_least_as_accurate_as_full_batch_steps_at_a_tenth_of_the_passes(caches):
    """Why mini-batches are the default: ten passes with batches of 64 train what 100 full-batch steps do."""
    train, val = caches
    full, mini = tiny_gated(), tiny_gated()
    fit(full, train, loss="ce", epochs=100, batch_size=None, lr=0.2, progress=False)
    fit(mini, train, loss="ce", epochs=10, batch_size=64, progress=False)
    for a, b in zip(gate_accuracy(mini, val), gate_accuracy(full, val)):
        assert a >= b - 0.02


def test_fit_refuses_a_batch_size_or_epoch_count_below_one(caches):
    with pytest.raises(ValueError, match="at least 1"):
        fit(tiny_gated(), caches[0], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        fit(tiny_gated(), caches[0], epochs=0, progress=False)
