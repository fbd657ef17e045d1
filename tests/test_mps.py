"""NVIDIA MPS (ablate/mps.py): how clients name the daemon's GPUs, the commands that start and stop a
daemon, the study daemon around the local Ray (ablate/launch.py) and a trial's renumbering (ablate/trial.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate import launch, mps
from ablate.spec import StudyError

ROOT = Path(__file__).resolve().parent.parent


def test_a_client_names_its_gpus_by_their_position_among_the_daemons():
    assert mps.client_devices(["3"], "1,3") == "1"
    assert mps.client_devices(["1"], "1,3") == "0"
    assert mps.client_devices(["3", "1"], "1, 3") == "1,0"  # spaces, and the order the client asks for
    assert mps.client_devices(["GPU-b"], "GPU-a,GPU-b") == "1"  # UUIDs, as CUDA_VISIBLE_DEVICES allows
    # a daemon that sees every GPU numbers them as the host does
    assert mps.client_devices(["2"], None) == "2"
    assert mps.client_devices(["0", "3"], None) == "0,3"


def test_a_gpu_the_daemon_does_not_serve_is_an_error_that_names_both():
    with pytest.raises(ValueError, match=r"GPU\(s\) 2 are not among the MPS daemon's \(1, 3\)"):
        mps.client_devices(["2"], "1,3")


def test_a_client_of_every_device_of_the_daemon_names_them_by_position():
    # a daemon on the second GPU of a two-GPU host: its client asks for device 0, the daemon's one GPU
    assert mps.client_env({"CUDA_VISIBLE_DEVICES": "1", "X": "y"}) == {"CUDA_VISIBLE_DEVICES": "0", "X": "y"}
    assert mps.client_env({"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == "0,1"
    # a daemon that saw every GPU: the client sees every GPU too
    assert "CUDA_VISIBLE_DEVICES" not in mps.client_env({"X": "y"})


@pytest.fixture
def commands(monkeypatch):
    """subprocess.run as ablate.mps calls it, recorded: (argv, env, stdin) per call; every call succeeds."""
    calls = []

    def run(argv, *, env, input=None, **options):
        calls.append((argv, env, input))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(mps.subprocess, "run", run)
    return calls


def test_the_daemon_starts_and_quits_in_an_environment_of_its_own(tmp_path, commands):
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1,3"}
    env = mps.start_daemon(tmp_path, base)
    expected = {
        **base,
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps-pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps-log"),
    }
    assert env == expected
    assert (tmp_path / "mps-pipe").is_dir() and (tmp_path / "mps-log").is_dir()
    assert mps.stop_daemon(env)
    assert commands == [
        (["nvidia-cuda-mps-control", "-d"], expected, None),
        (["nvidia-cuda-mps-control"], expected, b"quit\n"),
    ]


def test_a_daemon_that_does_not_start_says_why(tmp_path, monkeypatch):
    def refuse(argv, *, env, stdout, stderr):
        stdout.write(b"An instance of this daemon is already running\n")
        return subprocess.CompletedProcess(argv, 1)

    monkeypatch.setattr(mps.subprocess, "run", refuse)
    with pytest.raises(RuntimeError, match=r"-d` failed \(exit 1\): An instance of this daemon is already"):
        mps.start_daemon(tmp_path, {})


class MpsStudy:  # as much of a Design as launch.mps_daemon and launch.use_mps read
    def __init__(self, mps: bool | str = True, gpu: float = 0.25):
        from ablate.spec import Resources

        self.study = type("Study", (), {"resources": Resources(mps=mps, gpu=gpu)})()
        self.source = Path("study.yaml")


def test_a_study_daemon_is_exported_to_the_workers_and_quits_when_the_study_fails(commands, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/somebody/elses")
    monkeypatch.delenv(mps.SERVED, raising=False)
    with pytest.raises(KeyboardInterrupt), launch.mps_daemon(MpsStudy(), True, console=None):
        inside = dict(os.environ)
        raise KeyboardInterrupt  # Ctrl-C while trials run
    (start, daemon, _), (stop, quit_env, stdin) = commands
    assert start == ["nvidia-cuda-mps-control", "-d"] and stop == ["nvidia-cuda-mps-control"]
    assert stdin == b"quit\n" and quit_env == daemon
    folder = Path(daemon["CUDA_MPS_PIPE_DIRECTORY"]).parent
    assert folder.name.startswith("ablate-mps-") and not folder.exists()  # temporary, and gone
    assert daemon["CUDA_MPS_LOG_DIRECTORY"] == str(folder / "mps-log")
    assert daemon["CUDA_VISIBLE_DEVICES"] == "1,3"  # the driver's list, from which Ray hands out ids
    # while the study ran, Ray's workers would inherit the daemon's pipe and the list it serves
    assert inside["CUDA_MPS_PIPE_DIRECTORY"] == daemon["CUDA_MPS_PIPE_DIRECTORY"]
    assert inside[mps.SERVED] == "1,3"
    # afterwards the driver's environment is as it was
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/somebody/elses" and mps.SERVED not in os.environ


def test_a_daemon_on_every_gpu_needs_no_renumbering(commands, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with launch.mps_daemon(MpsStudy(), True, console=None) as running:
        assert running is True
        assert mps.SERVED not in os.environ and "CUDA_MPS_PIPE_DIRECTORY" in os.environ
    assert "CUDA_VISIBLE_DEVICES" not in commands[0][1]


def test_no_daemon_unless_the_study_asks(commands):
    with launch.mps_daemon(MpsStudy(False), False, console=None) as running:
        assert running is False
    assert commands == []


@pytest.mark.parametrize(
    ("setting", "gpu", "unavailable", "on", "said"),
    [
        (True, 0.25, None, True, ""),
        (False, 0.25, None, False, ""),
        ("auto", 0.25, None, True, "MPS: on (trials share GPUs)"),
        ("auto", 0.25, ("this machine has none", "set mps: false"), False, "MPS: off: this machine has none"),
        ("auto", 1, None, False, ""),  # one trial per GPU: nothing to share
        ("auto", 2, None, False, ""),
    ],
)
def test_which_launches_run_under_mps(monkeypatch, setting, gpu, unavailable, on, said):
    from rich.console import Console

    import ablate.preflight

    asked = []
    monkeypatch.setattr(
        ablate.preflight, "mps_unavailable", lambda address: asked.append(address) or unavailable
    )
    console = Console(record=True, width=200)
    options = launch.LaunchOptions(None, None, False, None)
    assert launch.use_mps(MpsStudy(setting, gpu), options, console) is on
    assert console.export_text().strip() == said
    assert asked == ([None] if said else [])  # only auto with shared GPUs looks at the machine


def test_a_daemon_that_does_not_start_is_a_study_error(monkeypatch):
    def refuse(folder):
        raise RuntimeError("`nvidia-cuda-mps-control -d` failed (exit 1): no")

    monkeypatch.setattr(mps, "start_daemon", refuse)
    failed = r"resources\.mps: `nvidia-cuda-mps-control -d` failed"
    with pytest.raises(StudyError, match=failed), launch.mps_daemon(MpsStudy(), True, console=None):
        pass


def test_under_auto_a_daemon_that_does_not_start_leaves_the_study_without_mps(monkeypatch):
    from rich.console import Console

    def refuse(folder):
        raise RuntimeError("`nvidia-cuda-mps-control -d` failed (exit 1): no")

    monkeypatch.setattr(mps, "start_daemon", refuse)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    console = Console(record=True, width=200)
    with launch.mps_daemon(MpsStudy("auto"), True, console=console) as running:
        assert running is False
        assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ  # the trials run as plain CUDA processes
    assert "MPS: off: the daemon did not start (`nvidia-cuda-mps-control -d` failed" in console.export_text()


def test_a_trial_renames_rays_gpu_ids_to_the_daemons(monkeypatch):
    import ray

    from ablate.trial import use_mps_numbering

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Ray set it
    monkeypatch.setenv(mps.SERVED, "1,3")
    use_mps_numbering()
    use_mps_numbering()  # the next trial in a reused worker: the same device
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.delenv(mps.SERVED)  # no daemon, or one on every GPU: Ray's ids stand
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    use_mps_numbering()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


# A driver whose CUDA_VISIBLE_DEVICES is "1,3" starts a Ray with two (pretended) GPUs; each of two
# workers with a GPU renumbers its devices as a trial under the study's daemon would.
RAY_WORKERS = """
import logging, os, ray
from ablate import mps
from ablate.trial import use_mps_numbering
os.environ[mps.SERVED] = os.environ["CUDA_VISIBLE_DEVICES"]
ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING)

@ray.remote(num_cpus=0.1, num_gpus=1)
class Worker:
    def devices(self):
        given = os.environ["CUDA_VISIBLE_DEVICES"]
        use_mps_numbering()
        return given, os.environ["CUDA_VISIBLE_DEVICES"]

print(sorted(ray.get([w.devices.remote() for w in [Worker.remote(), Worker.remote()]])))
"""


@pytest.mark.slow
def test_rays_gpu_ids_are_the_drivers_and_a_worker_renumbers_them_for_the_daemon():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1,3", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", RAY_WORKERS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[('1', '0'), ('3', '1')]"
