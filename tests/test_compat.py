"""The private timm names timm_dgate relies on (timm_dgate/compat.py) still exist and behave as used.

If a timm release renames or changes one of them, this fails loudly here, naming it, rather
than somewhere deep in the recipe or the Hub loader.
"""

from __future__ import annotations

import timm

from timm_dgate import compat


def test_hf_split_separates_repo_and_revision():
    assert compat.hf_split("timm/resnet50.a1_in1k@v2") == ("timm/resnet50.a1_in1k", "v2")
    assert compat.hf_split("org/name") == ("org/name", None)


def test_get_model_args_returns_the_create_model_kwargs_timm_recorded():
    model = timm.create_model("test_resnet", in_chans=1, num_classes=7)
    args = compat.get_model_args(model, {"drop_rate": 0.0})
    assert args["in_chans"] == 1 and args["num_classes"] == 7 and args["drop_rate"] == 0.0


def test_split_names_and_two_split_torch_datasets(tmp_path):
    assert "train" in compat.TRAIN_SPLIT_NAMES
    assert {"fashion_mnist", "cifar10"} <= set(compat.TORCH_TWO_SPLIT_DATASETS)
    (tmp_path / "validation").mkdir()
    assert compat.search_split(str(tmp_path), "validation") == str(tmp_path / "validation")
    assert compat.search_split(str(tmp_path), "holdout") == str(tmp_path)  # falls back to the root
