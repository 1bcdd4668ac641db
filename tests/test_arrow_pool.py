"""Arrow's allocator is the system one in every process of a job: set by ``import exits``
(before pyarrow's C++ default pool is chosen) and passed to every Ray worker by
``exits.console.ray_init`` (``arrow_pool_everywhere``), unless the user chose another."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

import exits
from exits import console


def test_import_exits_chooses_the_system_pool_for_arrows_cpp_code():
    code = ("import exits, pyarrow as pa, pyarrow.dataset as ds; "
            "print(pa.default_memory_pool().backend_name, exits.ARROW_POOL_SET_HERE)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != exits.ARROW_POOL_ENV}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert run.stdout.split() == ["system", "True"]
    # a user's choice wins and is remembered as theirs
    env[exits.ARROW_POOL_ENV] = "jemalloc"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert run.stdout.split() == ["jemalloc", "False"]


def test_the_variable_is_merged_into_the_runtime_env(monkeypatch):
    monkeypatch.setattr(exits, "ARROW_POOL_SET_HERE", True)
    kwargs = {"runtime_env": {"env_vars": {"A": "1"}, "working_dir": "."}, "num_gpus": 0}
    got = console.arrow_pool_everywhere(kwargs)
    assert got == {"runtime_env": {"env_vars": {"A": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"},
                                   "working_dir": "."}, "num_gpus": 0}  # fmt: skip
    assert kwargs["runtime_env"]["env_vars"] == {"A": "1"}  # the caller's dict is not changed
    assert console.arrow_pool_everywhere({}) == {
        "runtime_env": {"env_vars": {"ARROW_DEFAULT_MEMORY_POOL": "system"}}
    }


def test_a_users_choice_is_not_sent_twice(monkeypatch):
    monkeypatch.setattr(exits, "ARROW_POOL_SET_HERE", False)  # the user set the variable
    assert console.arrow_pool_everywhere({"num_cpus": 1}) == {"num_cpus": 1}


@pytest.mark.integration
def test_ray_workers_allocate_on_the_system_pool(monkeypatch):
    import ray

    monkeypatch.setattr(exits, "ARROW_POOL_SET_HERE", True)
    # the runtime env, not inheritance from this process, must carry it
    monkeypatch.delenv(exits.ARROW_POOL_ENV, raising=False)
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=1, include_dashboard=False,
             **console.arrow_pool_everywhere({}))  # fmt: skip
    try:

        @ray.remote
        def backend() -> str:
            import pyarrow as pa

            return pa.default_memory_pool().backend_name

        assert ray.get(backend.remote()) == "system"
    finally:
        ray.shutdown()
