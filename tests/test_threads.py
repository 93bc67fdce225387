"""CPU thread policy (nora_cli/threads.py): how many threads, and the OpenMP wait policy set before torch loads.
The speed it buys is measured in benchmarks/under_load.py, never here."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, **extra}


PROBE = ("import os; from nora_cli.threads import prepare_environment; prepare_environment(); "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, "PASSIVE None"),                            # nora's default
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's choice stands
    ({"GOMP_SPINCOUNT": "10000"}, "None 10000"),     # a spin count is a choice of wait behaviour too
])
def test_wait_policy_is_set_before_torch_unless_the_user_chose(extra: dict[str, str], expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(**extra), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == expected


def test_apply_honours_the_recipe_then_omp_num_threads_then_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "available_cpus", lambda: 4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its 4 CPUs
        info = threads.apply(None)
        assert (info["count"], info["source"]) == (2, "available CPUs") and torch.get_num_threads() == 2
        assert threads.apply(1)["count"] == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.apply(None)["source"] == "OMP_NUM_THREADS"
        assert torch.get_num_threads() == 1  # left as the user's OMP_NUM_THREADS made it
    finally:
        torch.set_num_threads(before)
