"""``timm-dgate serve FOLDER``: bad folders and options are one line and exit code 2 before Ray starts; run for
real (``slow``: its own Ray), it answers HTTP until interrupted and then leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import timm_dgate
from timm_dgate.cli import main as cli

from .test_cascade import random_pair
from .test_cli_errors import run
from .test_export import gated_with_mixed_exits
from .test_serve_requests import PROFILES, npy, own_answer

pytest.importorskip("ray.serve")

from .test_serve import free_port


def test_serve_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--shape {segments,whole,plain}" in out and "--batch-wait-timeout-s" in out


def test_a_missing_folder_or_a_cascade_per_segment_is_one_line_before_ray_starts(tmp_path, capsys):
    import ray

    code, _, err = run(["serve", str(tmp_path / "missing")], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing does not exist" in err
    small, big = random_pair()
    folder = timm_dgate.cascade([small, big], input_sizes=[(1, 16, 16), None]).save_pretrained(tmp_path / "cascade")
    code, _, err = run(["serve", str(folder)], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot serve" in err and "shape='whole'" in err
    code, _, err = run(["serve", str(folder), "--num-replicas", "many"], capsys)
    assert code == 2 and "--num-replicas must be a positive integer or 'auto'" in err
    assert not ray.is_initialized()


@pytest.mark.slow
def test_the_command_serves_http_until_interrupted_and_leaves_no_process(tmp_path):
    psutil = pytest.importorskip("psutil")
    gated, images = gated_with_mixed_exits()
    folder = gated.save_pretrained(tmp_path / "gated")
    port = free_port()
    command = [str(Path(sys.executable).parent / "timm-dgate"), "serve", str(folder), "--shape", "whole",
               "--port", str(port), "--num-cpus", "0.5"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                    assert json.loads(response.read())["shape"] == "whole"
                    break
            except OSError:  # not listening yet, a 404 before the application is up, or slow to answer
                assert server.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(1)
        for i in range(3):  # "mixed", "first", the active one (this model has no "late")
            request = urllib.request.Request(f"http://127.0.0.1:{port}/?profile={PROFILES[i] or ''}",
                                             data=npy(images[i]), headers={"Content-Type": "application/x-npy"})
            with urllib.request.urlopen(request, timeout=60) as response:
                reply = json.loads(response.read())
            assert reply["exit"] == own_answer(gated, images[i], PROFILES[i])[1]
        started = psutil.Process(server.pid).children(recursive=True)
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=120)
        assert server.returncode == 0, output[-3000:]
        assert "stopping" in output  # ("serving ... Ctrl-C stops" may not be printed yet: HTTP answers first)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    finally:  # a failure above still stops the server, Ray with it, and then whatever it left
        if server.poll() is None:
            left = psutil.Process(server.pid).children(recursive=True)
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            for process in psutil.wait_procs(left, timeout=10)[1]:
                process.kill()
