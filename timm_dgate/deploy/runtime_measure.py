"""What calibration and evaluation measure on an exported folder's runtime: its own exit scores, not the eager model's.

Exit scores move under quantization (an int8 folder's gates read int8 features), so thresholds for
such a folder are chosen on the runtime itself: ``timm_dgate.calibrate(OnnxGatedModel(folder),
val, max_drop=...)`` runs every segment over the validation images and searches the same
:class:`~timm_dgate.core.exit_table.ExitTable` as for an eager model, and ``timm_dgate.evaluate``
runs its profiles. FLOPs come from the manifest (counted on the eager model at export; an int8
multiply-add counts as a float one), so no torch model is needed. The provenance check applies:
images ``evaluate`` measured the runtime on are refused for calibrating it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ..core.cache import FeatureCache, check_labels
from ..core.costs import GateCosts
from ..core.exit_table import ExitTable
from ..core.profiles import Profile
from ..core.provenance import SeenImages, image_fingerprints
from ..core.scores import check_exit_score, exit_score
from ..errors import ExportError
from ..progress import progress_bar

PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def precision(dtype: torch.dtype | str, quantize: str | None = None) -> str:
    """What ``chosen_on`` calls a model's numbers: ``int8`` when quantized, else ``fp32``, ``bf16``, ..."""
    name = str(dtype).removeprefix("torch.")
    return quantize or PRECISIONS.get(name, name)

Runner = Any  # runtime.Runner: a segment file as a function of a tensor (typed there; importing it would be a cycle)


class RuntimeMeasures:
    """The members an :class:`~timm_dgate.core.contract.ExitModel` has beyond running, for ``ExportedGatedModel``.

    ``chosen_on`` maps each profile to the precision of the model its thresholds were chosen on
    (``fp32``: the eager model or a float export; ``int8``: this quantized runtime); a profile
    added here (``calibrate`` does) is marked as chosen on this runtime.
    """

    training = False  # an export runs inference only
    manifest: Any
    segments: list[Runner]
    dtype: torch.dtype
    seen_images: SeenImages
    chosen_on: dict[str, str]

    @property
    def precision(self) -> str:
        """``int8`` for a quantized folder, else the segments' float type (``fp32``, ``bf16``, ...)."""
        return precision(self.manifest.dtype, self.manifest.quantize)

    @property
    def costs(self) -> GateCosts:
        """FLOPs per image up to each gate, of each gate and of the whole backbone, as recorded at export."""
        recorded = self.manifest.costs
        if recorded is None:
            raise ExportError(f"{self.folder}/manifest.json records no FLOPs (an export by an older timm_dgate): "
                              "export the model again to calibrate or evaluate the runtime")
        return GateCosts(tuple(recorded["to_gate"]), tuple(recorded["gate"]), float(recorded["backbone"]))

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the segments take it: images ``(B, *input_size)`` in the export's dtype."""
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_size):
            raise ValueError(f"expected images (B, {', '.join(map(str, self.input_size))}), got {tuple(x.shape)}")
        return x.to(self.dtype)

    @torch.inference_mode()
    def forward_gates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every segment on the whole batch: every gate's margins and the logits (no exits)."""
        x, margins = self.check_input(x), []
        for segment in self.segments[:-1]:
            x, gate_margins = segment(x)
            margins.append(gate_margins)
        (logits,) = self.segments[-1](x)
        return margins, logits

    @torch.inference_mode()
    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exported backbone's logits for every sample (no exits; the gates' margins are computed and dropped)."""
        x = self.check_input(x)
        for segment in self.segments[:-1]:
            x = segment(x)[0]
        return self.segments[-1](x)[0]

    def validation_table(self, data: Iterable, exit_score: str | None = None) -> tuple[ExitTable, str]:
        """What :func:`timm_dgate.calibrate` searches, from this runtime's own scores on validation ``data``
        (``(images, labels)`` batches); images ``evaluate`` measured it on are refused."""
        if isinstance(data, FeatureCache):
            raise ValueError("a feature cache holds the eager model's features, not this runtime's: calibrate an "
                             "exported model on a loader of validation images")
        kind = check_exit_score(exit_score or self.exit_score)
        scores, correct, seen = [], [], []
        for images, labels in progress_bar(data, "validation on the exported model"):
            labels = torch.as_tensor(labels)
            check_labels(labels, self.num_classes)
            margins, logits = self.forward_gates(images)
            scores.append(_score_rows(margins, kind, len(labels)))
            correct.append(torch.stack([o.argmax(1).cpu() == labels.cpu() for o in [*margins, logits]]))
            seen.append(image_fingerprints(images))
        if not scores:
            raise ValueError("the validation data is empty: nothing to calibrate on")
        self.seen_images.check_calibration(torch.cat(seen))
        return ExitTable(torch.cat(scores, 1), torch.cat(correct, 1), self.costs), "validation"

    def add_profile(self, profile: Profile, activate: bool = False) -> None:
        """Store a named profile, marked as chosen on this runtime (``chosen_on``)."""
        super().add_profile(profile, activate)  # type: ignore[misc]
        self.chosen_on[profile.name] = self.precision

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """No trainable parameters: one empty tensor on the device and in the dtype inputs go to."""
        yield torch.empty(0, dtype=self.dtype)

    def train(self, mode: bool = True) -> RuntimeMeasures:
        if mode:
            raise ExportError("an exported model runs inference only: it has no train mode")
        return self

    def eval(self) -> RuntimeMeasures:
        return self


def _score_rows(margins: Sequence[torch.Tensor], kind: str, batch: int) -> torch.Tensor:
    if not margins:
        return torch.empty((0, batch), dtype=torch.float64)
    return torch.stack([exit_score(m.cpu(), kind) for m in margins]).double()
