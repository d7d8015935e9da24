"""Calibration: a validation set in, thresholds meeting a target stored on the model as a named profile.

The search itself is ``search`` (and ``learn_then_test`` for ``confidence=``); this module guards
its input (validation images only, a plain model that works) and turns the answer into a
:class:`~timm_dgate.core.profiles.Profile`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.cache import FeatureCache, cache_features, check_labels
from ..core.contract import ExitModel, GatedBackbone
from ..core.profiles import Profile
from ..errors import ChanceAccuracyError
from .goals import Target
from .search import search_thresholds


def chance_bound(num_classes: int) -> float:
    """The accuracy a working plain model clears: twice chance, and at most halfway from chance to perfect.

    Random weights, another class order or badly wrong preprocessing land near chance; the cap
    keeps the bound reachable with two classes (75%, where twice chance would be 100%).
    """
    chance = 1 / num_classes
    return min(2 * chance, (1 + chance) / 2)


def check_plain_accuracy(accuracy: float, num_classes: int, split: str, num_images: int) -> None:
    """Raise :class:`~timm_dgate.ChanceAccuracyError` when the plain model scores below :func:`chance_bound`.

    Thresholds are chosen relative to the plain model and gates are judged against it: a broken
    one makes every profile meaningless (all samples out at the first gate "within 0 pt of it").
    """
    bound = chance_bound(num_classes)
    if accuracy >= bound:
        return
    raise ChanceAccuracyError(
        f"the plain model scores {accuracy:.1%} on {num_images} {split} images, about chance for {num_classes} "
        f"classes ({1 / num_classes:.1%}; a working model clears {bound:.0%}), so gates calibrated or measured "
        "against it mean nothing. Usual causes: a checkpoint that did not load (random weights), preprocessing "
        "that does not match training (input size, mean/std, resize/crop: the model's pretrained_cfg), or labels "
        "in another class order than the model's head. To go on anyway pass allow_chance_accuracy=True "
        "(--allow-chance-accuracy on the command line)."
    )


def validation_cache(model: GatedBackbone, data: object, progress: bool = True) -> FeatureCache:
    """A validation cache from a loader, or ``data`` itself if it is one.

    Refused: a cache labelled ``test``, and data whose images the gates were fit on or that
    ``evaluate`` measured the model on, recognised by their pixels (``timm_dgate.core.provenance``).
    """
    if isinstance(data, FeatureCache):
        cache = data
    else:
        cache = cache_features(model, data, split="validation", progress=progress)
    if cache.split == "test":
        raise ValueError(
            "calibration must not see the test split: thresholds are chosen on validation data, "
            "and accuracy is reported on a test split that chose nothing"
        )
    check_labels(cache.labels, model.num_classes)
    model.seen_images.check_calibration(cache.fingerprints)
    return cache


def calibrate(
    model: ExitModel,
    data: object,
    *,
    max_drop: float | None = None,
    min_accuracy: float | None = None,
    max_gflops: float | None = None,
    confidence: float | None = None,
    name: str | None = None,
    method: str = "coordinate",
    exit_score: str | None = None,
    activate: bool = True,
    split: str | None = None,
    allow_chance_accuracy: bool = False,
) -> Profile:
    """Choose thresholds on validation ``data`` (a loader or a validation :class:`FeatureCache`).

    ``model`` is a :class:`~timm_dgate.GatedModel` or a :class:`~timm_dgate.Cascade`: its
    ``validation_table`` turns ``data`` into the :class:`~timm_dgate.ExitTable` searched here, so
    one search covers every exit of every member of a cascade.

    Give one target: ``max_drop`` (fraction below the plain model's validation accuracy,
    ``0.005`` = half a point), ``min_accuracy`` (fraction in [0, 1)) or ``max_gflops`` (average
    per image, gates included). The result is stored on the model as a named :class:`Profile`.
    A target the validation data cannot meet raises :class:`~timm_dgate.CalibrationError`
    naming the best reachable value, and nothing is stored or activated.

    ``confidence`` (e.g. ``0.9``) makes an accuracy target hold on new data with that
    probability rather than on the validation estimate: half of ``data`` proposes thresholds,
    the other half tests them with exact tests (``calibration.exact``: the promise holds at every
    size; too few images for any gate to pass raise :class:`~timm_dgate.CalibrationError` naming
    the count needed) (:func:`~timm_dgate.calibration.search.search_thresholds`). Without
    it, more than half of all profiles land below their target on new data; with it, expect fewer
    FLOPs saved.

    ``split`` is what the profile records as its calibration data (default: the cache's split
    name); say which images they were, so that later calibrations can be checked against it.
    """
    target = Target(min_accuracy=min_accuracy, max_drop=max_drop, max_gflops=max_gflops, confidence=confidence)
    score = exit_score or model.exit_score
    table, data_split = model.validation_table(data, score)
    if not allow_chance_accuracy:
        check_plain_accuracy(table.plain_accuracy, model.num_classes, data_split, table.correct.shape[1])
    thresholds = search_thresholds(table, target, method)
    accuracy, gflops, fractions = table.evaluate(thresholds)
    profile = Profile(
        name=name or f"{target.describe()} ({score})",
        thresholds=thresholds,
        exit_score=score,
        target=target.describe(),
        split=split or data_split,
        val_accuracy=accuracy,
        val_gflops=gflops,
        val_plain_accuracy=table.plain_accuracy,
        exit_fractions=tuple(fractions.tolist()),
    )
    model.add_profile(profile, activate=activate)
    return profile


def calibrate_targets(
    model: ExitModel,
    cache: FeatureCache,
    split: str,
    max_drop_points: Sequence[float] = (),
    max_gflops: Sequence[float] = (),
    confidence: float | None = None,
    allow_chance_accuracy: bool = False,
) -> list[Profile]:
    """One profile per target, named ``drop-<pt>pt`` (drops in points) / ``gflops-<G>``; the first is active.

    ``split`` is what each profile records as the images that chose it.
    """
    options = {"split": split, "allow_chance_accuracy": allow_chance_accuracy}
    profiles = [
        calibrate(model, cache, max_drop=d / 100, confidence=confidence, name=f"drop-{d:g}pt", **options)
        for d in max_drop_points
    ]
    profiles += [calibrate(model, cache, max_gflops=g, name=f"gflops-{g:g}", **options) for g in max_gflops]
    model.use_profile(profiles[0].name)
    return profiles
