"""Trials per GPU under MPS (ablate/bench/packing.py): what an MPS client is told about its devices."""

from __future__ import annotations

from ablate.bench.packing import mps_client_env


def test_an_mps_client_names_the_daemons_devices_by_position():
    # a daemon on the second GPU of a two-GPU host: its client asks for device 0, the daemon's one GPU
    assert mps_client_env({"CUDA_VISIBLE_DEVICES": "1", "X": "y"}) == {"CUDA_VISIBLE_DEVICES": "0", "X": "y"}
    assert mps_client_env({"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == "0,1"
    # a daemon that saw every GPU: the client sees every GPU too
    assert "CUDA_VISIBLE_DEVICES" not in mps_client_env({"X": "y"})
