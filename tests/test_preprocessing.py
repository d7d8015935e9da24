"""A trained model's preprocessing travels with it, and a plain model at chance stops the run (issue 18).

The backbone is the demo's own kind: trained here on real Fashion-MNIST by ``cached_backbone``
and saved in timm's layout. Whatever follows timm's conventions (plain timm, the recipe's
``torch/fashion_mnist`` pipeline, a model card) must then read images as training did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torch.utils.data import TensorDataset

from timm_dgate.cli import main as cli
from timm_dgate.cli.recipe_data import DataConfig, RecipeData
from timm_dgate.demo.backbone import accuracy, cached_backbone
from timm_dgate.fashion_mnist import CLASSES, MEAN, STD, default_root, load_splits, preprocess, timm_data_config

MODEL = ["--model", "test_resnet", "--in-chans", "1", "--num-classes", "10"]
LIMIT = 300
FAST = ["--limit", str(LIMIT), "-j", "0", "-b", "100", "--gate-epochs", "20", "--max-drop", "1",
        "--timing-images", "32"]
BROKEN_NORMALISATION = ["--mean", "0.9", "--std", "0.05"]


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image[0].numpy(), mode="L") for image in images]


def load_plain(folder: Path) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("size", [28, 29, 32, 36, 58])
def test_timm_transform_of_the_saved_config_reads_raw_images_as_preprocess_does(size, fmnist):
    """At 29, 36 and 58 px the exact crop_pct would make timm resize to 27 px; the saved one keeps 28."""
    images = fmnist.test.tensors[0][:64]
    transform = create_transform(**timm_data_config(size), is_training=False)
    timm_read = torch.stack([transform(image) for image in pil_images(images)])
    assert timm_read.shape == (64, 1, size, size)
    assert (timm_read - preprocess(images, size)).abs().max() < 1e-6  # float rounding only


def test_a_trained_backbone_saves_the_preprocessing_it_was_trained_with(trained_backbone):
    saved = json.loads((trained_backbone / "config.json").read_text())["pretrained_cfg"]
    assert "tag" not in saved and "hf_hub_id" not in saved  # claims no ImageNet weights
    assert saved["input_size"] == [1, 32, 32] and saved["mean"] == [MEAN] and saved["std"] == [STD]
    assert saved["crop_mode"] == "center" and saved["label_names"] == list(CLASSES)
    config = resolve_data_config(model=load_plain(trained_backbone))  # what plain timm makes of it
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(timm_data_config(32)))


def test_plain_timm_scores_a_saved_backbone_as_its_training_did(trained_backbone, fmnist):
    """timm alone (local-dir, resolve_data_config, create_transform) on raw images: the demo's own accuracy."""
    model = load_plain(trained_backbone)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    images, labels = fmnist.test.tensors
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in pil_images(images)]))
    demo = accuracy(model, fmnist.test)
    assert demo > 0.5  # a working model, so the comparison means something
    assert abs((logits.argmax(1) == labels).double().mean().item() - demo) <= 0.003


def test_a_backbone_cached_by_an_older_version_gets_its_config_rewritten_not_retrained(tmp_path, trained_backbone,
                                                                                       fmnist, capsys):
    folder = tmp_path / "backbone"
    old = timm.create_model("test_resnet", in_chans=1, num_classes=10)  # timm's ImageNet cfg, as older versions saved
    old.load_state_dict(load_plain(trained_backbone).state_dict())
    timm.models.save_for_hf(old, folder, model_args={"in_chans": 1, "num_classes": 10}, safe_serialization=True)
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["tag"] == "r160_in1k"

    model = cached_backbone("test_resnet", fmnist.train, folder)
    printed = capsys.readouterr().out
    assert "trained earlier" in printed and "rewrote" in printed
    rewritten, trained = (json.loads((f / "config.json").read_text()) for f in (folder, trained_backbone))
    assert rewritten == trained
    weights = load_file(folder / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in load_file(trained_backbone / "model.safetensors").items())
    assert list(resolve_data_config(model=model)["mean"]) == [MEAN]  # the model handed back says so too
    cached_backbone("test_resnet", fmnist.train, folder)
    assert "rewrote" not in capsys.readouterr().out  # once is enough


@pytest.fixture(scope="module")
def full_test() -> TensorDataset:
    return load_splits(val_size=1000).test


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, trained_backbone) -> Path:
    """The recipe on ``torch/fashion_mnist`` with the trained backbone's safetensors as --initial-checkpoint."""
    out = tmp_path_factory.mktemp("fmnist")
    argv = [*MODEL, "--initial-checkpoint", str(trained_backbone / "model.safetensors"), "--dataset",
            "torch/fashion_mnist", "--data-dir", str(default_root()), "--test-split", "test", *FAST,
            "--output", str(out)]
    assert cli.fit_main(argv) == 0
    return out


def test_recipe_reads_a_saved_backbone_with_its_own_preprocessing(fitted, trained_backbone, full_test):
    results = json.loads((fitted / "results.json").read_text())
    config = results["preprocessing"]["data_config"]
    assert config["mean"] == [MEAN] and config["std"] == [STD] and config["input_size"] == [1, 32, 32]
    assert results["preprocessing"]["source"] == (
        f"from the checkpoint's pretrained_cfg in {trained_backbone / 'config.json'}"
    )
    assert "Preprocessing: input 1x32x32, mean 0.286, std 0.353, interpolation bilinear" in (
        (fitted / "results.md").read_text()
    )
    assert "mean 0.286, std 0.353" in (fitted / "hub" / "README.md").read_text()  # the model card says it too

    # the same test images, read as the demo reads them
    spec = DataConfig(dataset="torch/fashion_mnist", data_dir=str(default_root()), test_split="test", limit=LIMIT)
    indices = RecipeData(spec, config).test().dataset.indices
    images, labels = full_test.tensors
    demo = accuracy(load_plain(trained_backbone), TensorDataset(images[indices], labels[indices]))
    assert demo > 0.5 and abs(results["test"]["plain_accuracy"] - demo) <= 0.003


def test_mismatched_normalisation_stops_the_recipe_with_exit_2_unless_allowed(tmp_path, trained_backbone, capsys):
    argv = ["fit", *MODEL, "--initial-checkpoint", str(trained_backbone / "model.safetensors"), "--dataset",
            "torch/fashion_mnist", "--data-dir", str(default_root()), "--test-split", "test", *FAST,
            *BROKEN_NORMALISATION, "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "about chance for 10 classes" in err and "a checkpoint that did not load" in err
    assert "preprocessing that does not match training" in err and "another class order" in err
    assert "--allow-chance-accuracy" in err and "Traceback" not in err
    assert not (tmp_path / "hub").exists()  # nothing published

    assert cli.main([*argv, "--allow-chance-accuracy"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"]["plain_accuracy"] < 0.2
    assert results["preprocessing"]["source"].startswith("--mean, --std from flags; the rest from the checkpoint's")


@pytest.mark.parametrize(
    "command", [["eval", "--test-split", "test", "--timing-images", "32"], ["calibrate", "--max-drop", "2"]]
)
def test_eval_and_calibrate_stop_on_a_folder_whose_saved_preprocessing_is_wrong(command, fitted, tmp_path, capsys):
    folder = shutil.copytree(fitted / "hub", tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.9], std=[0.05])
    (folder / "config.json").write_text(json.dumps(config))
    argv = [command[0], str(folder), "--dataset", "torch/fashion_mnist", "--data-dir", str(default_root()),
            "--limit", str(LIMIT), "-j", "0", *command[1:]]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2 and "about chance" in capsys.readouterr().err
    assert cli.main([*argv, "--allow-chance-accuracy"]) == 0
