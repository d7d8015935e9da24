"""The private timm names timm_dgate relies on, in one place, because timm has no public equivalent.

- ``hf_split``: splits ``org/name@revision`` exactly as timm's own Hub loader does.
- ``get_model_args``: the ``create_model`` kwargs timm recorded on a model, so a saved backbone
  rebuilds with the same arguments (``save_for_hf(model_args=...)`` needs them).
- ``search_split``, ``TRAIN_SPLIT_NAMES``, ``TORCH_TWO_SPLIT_DATASETS``: how ``create_dataset``
  resolves split names on disk, and which ``torch/`` data sets have only train and test splits,
  so the recipe refuses a validation split that would be the test data.

tests/test_compat.py fails loudly when a timm release renames or changes any of them.
"""

from __future__ import annotations

from timm.data.dataset_factory import _TORCH_BASIC_DS as TORCH_TWO_SPLIT_DATASETS
from timm.data.dataset_factory import _TRAIN_SYNONYM as TRAIN_SPLIT_NAMES
from timm.data.dataset_factory import _search_split as search_split
from timm.models._hub import hf_split
from timm.models._input import get_model_args

__all__ = ["TORCH_TWO_SPLIT_DATASETS", "TRAIN_SPLIT_NAMES", "get_model_args", "hf_split", "search_split"]
