"""Every user error on the command line is one line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from timm_dgate.cli import main as cli

from .helpers import tiny_gated


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_stages_of_an_unknown_model_is_one_line(capsys):
    code, _, err = run(["stages", "resnet_nosuch"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown timm model 'resnet_nosuch'" in err


def test_stages_builds_the_model_with_the_channels_of_the_input_size(capsys):
    assert cli.main(["stages", "resnet18", "--input-size", "1", "32", "32", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "refused" not in out and [line.split()[0] for line in out.splitlines() if " yes " in line] == [
        "layer1", "layer2", "layer3",
    ]


def test_push_without_a_reachable_hub_is_one_line(tmp_path, monkeypatch, capsys):
    """A real connection attempt through huggingface_hub's own client, to a local port nothing listens on."""
    tiny_gated().save_pretrained(tmp_path / "gated")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code, _, err = run(["push", str(tmp_path / "gated"), "org/gated", "--token", "hf_test"], capsys)
    assert code == 2 and err.count("\n") == 1 and "could not push to 'org/gated'" in err
