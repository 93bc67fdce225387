"""CPU thread policy (nora_cli/threads.py): how many threads a run starts with, and the governor that gives
cores back to other busy work. The speed it buys is measured in benchmarks/under_load.py, never here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nora_cli import threads


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(v1) is None
    assert threads.cgroup_quota(tmp_path / "absent") is None


def test_available_cpus_is_the_affinity_mask_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.available_cpus() == 4
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.5)  # 1.5 CPUs of quota: 2 threads
    assert threads.available_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert threads.available_cpus() == 1


def _fake_proc(root: Path, running: int, ours: str) -> Path:
    """A /proc with `running` runnable tasks machine-wide and one thread per letter of `ours` (its state)."""
    root.mkdir(parents=True)
    (root / "stat").write_text(f"cpu  1 2 3\nprocs_running {running}\nprocs_blocked 0\n")
    for i, state in enumerate(ours):
        task = root / "self" / "task" / str(100 + i)
        task.mkdir(parents=True)
        task.joinpath("stat").write_text(f"{100 + i} (python3 (x)) {state} 1 2 3\n")  # ")" inside comm too
    return root


def test_others_running_subtracts_this_process_own_threads(tmp_path: Path) -> None:
    assert threads.others_running(_fake_proc(tmp_path / "a", running=3, ours="RRS")) == 1
    assert threads.others_running(_fake_proc(tmp_path / "b", running=2, ours="RR")) == 0
    assert threads.others_running(tmp_path / "none") is None


def test_governor_uses_the_cpus_other_work_leaves_free(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    governor = threads.ThreadGovernor(base=2, cpus=2, interval=3600)  # the sampler never fires here
    try:
        assert governor.target() == 2
        governor.others = 0.9  # one busy process (smoothed)
        governor.poll()
        assert governor.target() == 1 and torch.get_num_threads() == 1
        governor.others = 3.0  # more work than CPUs: still one thread
        assert governor.target() == 1
        governor.others = 0.2  # it ended
        governor.poll()
        assert torch.get_num_threads() == 2
    finally:
        governor.close()
        torch.set_num_threads(before)
    assert not governor._sampler.is_alive()


def test_the_sampler_averages_others_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "others_running", lambda: 1)
    governor = threads.ThreadGovernor(base=2, cpus=2, interval=0.01, smoothing=0.5)
    try:
        deadline = time.monotonic() + 5
        while governor.others < 0.9 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0.9 <= governor.others <= 1.0 and governor.target() == 1
    finally:
        governor.close()


def test_apply_honours_the_recipe_then_omp_num_threads_then_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "available_cpus", lambda: 4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its 4 CPUs
        with threads.cpu_threads(None) as (info, governor):
            assert (info["count"], info["source"], info["adaptive"]) == (2, "available CPUs", True)
            assert torch.get_num_threads() == 2 and governor is not None and governor.base == 2
        assert not governor._sampler.is_alive()  # stopped with the run
        with threads.cpu_threads(1) as (info, governor):  # pinned: no governor
            assert info["count"] == 1 and governor is None and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        with threads.cpu_threads(None) as (info, governor):
            assert info["source"] == "OMP_NUM_THREADS" and governor is None
        assert torch.get_num_threads() == 1  # left as the user's OMP_NUM_THREADS made it
    finally:
        torch.set_num_threads(before)
