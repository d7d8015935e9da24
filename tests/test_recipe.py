"""The fit recipe and the CLI, run as users run them: on real Fashion-MNIST images with a tiny timm model.

The two-process ``accelerate launch`` runs of recipes/fit.py are those of docs/recipes.md,
checked in tests/test_recipe_docs.py (one launch costs ~20 s here). No network: the backbone
is a ``test_resnet`` trained on a Fashion-MNIST slice (the ``trained_backbone`` fixture), whose
``model.safetensors`` the recipe loads with ``--initial-checkpoint``, as a user's own trained
model would be; a random one scores chance, which the recipe refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from PIL import Image

import timm_dgate
from timm_dgate.cli import main as cli
from timm_dgate.cli import recipe
from timm_dgate.cli.recipe_data import DataConfig, RecipeData, SplitData, data_config
from timm_dgate.fashion_mnist import load_splits
from timm_dgate.fitting.gate_kinds import DEFAULT_GATE_KIND, GATE_KINDS

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "test_resnet", "--in-chans", "1", "--num-classes", "10", "--input-size", "1", "32", "32"]
FAST = ["-j", "0", "-b", "64", "--gate-epochs", "30", "--timing-images", "64"]


@pytest.fixture(scope="module")
def checkpoint(trained_backbone) -> Path:
    return trained_backbone / "model.safetensors"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A user's own data: PNGs in class folders under train/ and validation/ (real Fashion-MNIST images)."""
    root = tmp_path_factory.mktemp("images")
    splits = load_splits(val_size=100, limit=160)
    for name, data in (("train", splits.train), ("validation", splits.val)):
        images, labels = data.tensors
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / name / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, image_folder, checkpoint) -> Path:
    """``timm-dgate fit`` on the image folder, validation held out of train, validation/ as the test split."""
    out = tmp_path_factory.mktemp("fitted")
    argv = ["fit", *MODEL, "--initial-checkpoint", str(checkpoint), "--data-dir", str(image_folder),
            "--test-split", "validation", "--val-fraction", "0.25", "--max-drop", "0", "1", "--max-gflops", "0.007",
            "--output", str(out), *FAST]
    assert cli.main(argv) == 0
    return out


def test_recipe_on_an_image_folder_then_a_rerun_reuses_the_caches(tmp_path, image_folder, checkpoint, monkeypatch,
                                                                  intercepted_hub, capsys):
    argv = [*MODEL, "--initial-checkpoint", str(checkpoint), "--data-dir", str(image_folder),
            "--val-split", "validation", "--max-drop", "0.5", "--output", str(tmp_path), *FAST]
    assert cli.fit_main(argv) == 0
    first = capsys.readouterr().out
    assert "validation: 100 images (validation)" in first and "No --test-split" in (tmp_path / "results.md").read_text()
    gated = timm_dgate.from_pretrained(tmp_path / "hub")
    assert list(gated.profiles) == ["drop-0.5pt"] and gated.gate_loss == "ce"  # the default kind: MLP gates, CE
    kind = GATE_KINDS[DEFAULT_GATE_KIND]
    assert gated.config.gate_head == kind.head == "mlp" and gated.config.gate_head_options == kind.head_options

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although every split was cached")

    monkeypatch.setattr(recipe, "cache_features", no_backbone)
    assert cli.fit_main([*argv, "--gate-kind", "ce", "--max-drop", "1", "--push-to-hub", "org/ce-gates"]) == 0
    assert intercepted_hub.repo["repo_id"] == "org/ce-gates"  # the real push, intercepted at its HTTP calls
    assert intercepted_hub.files["tradeoff.png"] == (tmp_path / "tradeoff.png").read_bytes()
    assert intercepted_hub.files["profiles.json"] == (tmp_path / "hub" / "profiles.json").read_bytes()
    assert capsys.readouterr().out.count("reusing cached") == 2  # train and validation
    gated = timm_dgate.from_pretrained(tmp_path / "hub")
    assert list(gated.profiles) == ["drop-1pt"] and gated.exit_score == "softmax"


def test_fit_subcommand_holds_out_validation_and_saves_a_loadable_folder(fitted):
    results = json.loads((fitted / "results.json").read_text())
    assert results["data"]["train"]["images"] == 120 and results["data"]["validation"]["images"] == 40
    assert results["data"]["test"]["images"] == 100
    gated = timm_dgate.from_pretrained(fitted / "hub")
    assert set(gated.profiles) == {"drop-0pt", "drop-1pt", "gflops-0.007"}
    assert {p.split for p in gated.profiles.values()} == {"validation: 0.25 of 'train' held out (seed 42)"}
    assert gated.base_model.pretrained_cfg["input_size"] == (1, 32, 32)  # preprocessing travels with the folder


def image_hashes(split: SplitData) -> set[str]:
    """What a split really holds: one hash per image as the recipe reads it (pixels after the transform)."""
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image, _ in split.dataset}


def recipe_splits(image_folder: Path, **data: object) -> dict[str, SplitData]:
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    return RecipeData(DataConfig(data_dir=str(image_folder), **data), data_config(model, (1, 32, 32))).splits()


@pytest.mark.parametrize("limit", [None, 25])
def test_held_out_validation_shares_no_image_with_training(image_folder, limit):
    splits = recipe_splits(image_folder, val_fraction=0.25, limit=limit)
    train, validation = image_hashes(splits["train"]), image_hashes(splits["validation"])
    assert (len(train), len(validation)) == ((120, 40) if limit is None else (25, 25))
    assert not train & validation
    whole = image_hashes(recipe_splits(image_folder, val_split="validation")["train"])
    assert len(whole) == 160 and train | validation <= whole  # both are carved out of the train folder


def test_calibrate_eval_bench_and_push_subcommands(tmp_path, fitted, image_folder, intercepted_hub, capsys):
    data = ["--data-dir", str(image_folder), "--val-fraction", "0.25", "-j", "0"]
    copy = tmp_path / "copy"
    calibrate = ["calibrate", str(fitted / "hub"), *data, "--max-drop", "2", "--confidence", "0.9"]
    assert cli.main([*calibrate, "--output", str(copy)]) == 0
    assert timm_dgate.from_pretrained(copy).profiles["drop-2pt"].target.endswith("with 90% confidence")
    report = tmp_path / "eval.json"
    assert cli.main(["eval", str(copy), *data, "--test-split", "validation", "--profile", "drop-2pt",
                     "--timing-images", "32", "--json", str(report)]) == 0
    assert "| drop-2pt |" in capsys.readouterr().out
    assert json.loads(report.read_text())["num_images"] == 100
    assert cli.main(["bench", str(copy), *data, "--batch-sizes", "1", "16", "--images", "32", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "| 1 | drop-0pt |" in table and "| 16 | drop-2pt |" in table

    assert cli.main(["push", str(copy), "org/test-dgate", "--private"]) == 0
    calls = intercepted_hub
    assert calls.repo["repo_id"] == "org/test-dgate" and calls.repo["private"] is True
    assert {"config.json", "model.safetensors", "dgate_config.json"} <= set(calls.files)  # the backbone goes too
    assert "tradeoff.png" not in calls.files  # the copy has no plot; the fit folder has one
    assert calls.files["profiles.json"] == (copy / "profiles.json").read_bytes()
    assert cli.main(["push", str(fitted / "hub"), "org/test-dgate"]) == 0
    assert calls.files["tradeoff.png"] == (fitted / "hub" / "tradeoff.png").read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", *MODEL, "--data-dir", "/no/such/dir"], "does not exist"),
        (["fit", *MODEL[:2], "--num-classes", "-3", "--data-dir", "{images}"], "--num-classes must be positive"),
        (["fit", *MODEL, "--data-dir", "{images}", "--gates", "layer9"], "unknown gate position"),
        (["fit", *MODEL, "--data-dir", "{images}", "--val-split", "holdout"], "split 'holdout' not found"),
        (["fit", *MODEL, "--data-dir", "{images}", "--val-split", "validation", "--test-split", "validation"],
         "same data"),
        (["fit", *MODEL, "--data-dir", "{images}", "--initial-checkpoint", "/no/such.pth"], "not a file"),
        (["fit", *MODEL, "--dataset", "torch/fashion_mnist", "--val-split", "validation", "--test-split", "test"],
         "only train and test"),
        (["calibrate", "{fitted}", "--data-dir", "{images}", "--max-drop", "-1"],
         "--max-drop values are points in [0, 100)"),
        (["calibrate", "{fitted}", "--data-dir", "{images}", "--confidence", "95"], "--confidence must be in"),
        (["calibrate", "{fitted}", "--data-dir", "{images}"], "0.1 of 'train' held out (seed 42), which contains "
         "images the gates were fit on"),  # the fit held out 0.25
        (["calibrate", "{fitted}", "--data-dir", "{images}", "--val-fraction", "0.25", "--seed", "1"], "seed 1"),
        (["eval", "{fitted}", "--data-dir", "{images}", "--test-split", "validation", "--profile", "nope"],
         "has no profile nope"),
        (["bench", "/no/such/folder"], "is not a folder"),
        (["fit", "--model", "no_such_model_xyz", "--data-dir", "{images}"], "timm could not create"),
        (["fit", "--model", "resnet5", "--data-dir", "{images}"], "did you mean resnet50"),
        (["fit", *MODEL], "--data-dir is required"),
        (["fit", *MODEL, "--data-dir", "{images}", "--gate-batch-size", "0"], "a positive number of images or 'full'"),
        (["demo", "--confidence", "0.3"], "--confidence must be in [0.5, 1), or 0 for none"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, image_folder, fitted, capsys):
    argv = [a.format(images=image_folder, fitted=fitted / "hub") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "-j", "0"] if argv[0] not in ("bench", "demo") else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_recipe_script_reports_bad_arguments_like_argparse():
    argv = [sys.executable, str(ROOT / "recipes/fit.py"), "--model", "test_resnet", "--gate-kind", "svm"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "invalid choice: 'svm'" in done.stderr


@pytest.mark.parametrize(("flag", "expected"), [("256", 256), ("full", None)])
def test_gate_batch_size_flag_takes_a_count_or_full_batch(flag, expected, image_folder):
    from timm_dgate.cli.arguments import build_fit_parser
    from timm_dgate.cli.recipe import RecipeConfig

    args = build_fit_parser().parse_args([*MODEL, "--data-dir", str(image_folder), "--gate-batch-size", flag])
    assert RecipeConfig.from_args(args).gate_batch_size == expected
