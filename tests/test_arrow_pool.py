"""Arrow's allocator is the system one in the driver and in every Ray worker of a job
(exits.console.arrow_pool_everywhere), unless the user chose another."""

from __future__ import annotations

import pyarrow as pa
import pytest

from exits import console


@pytest.fixture
def fresh_env(monkeypatch):
    monkeypatch.delenv(console.ARROW_POOL_ENV, raising=False)
    monkeypatch.setattr(console, "_arrow_pool_set_here", False)
    yield monkeypatch


def test_pool_set_here_and_merged_into_the_runtime_env(fresh_env):
    kwargs = {"runtime_env": {"env_vars": {"A": "1"}, "working_dir": "."}, "num_gpus": 0}
    got = console.arrow_pool_everywhere(kwargs)
    assert got == {"runtime_env": {"env_vars": {"A": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"},
                                   "working_dir": "."}, "num_gpus": 0}  # fmt: skip
    assert kwargs["runtime_env"]["env_vars"] == {"A": "1"}  # the caller's dict is not changed
    assert pa.default_memory_pool().backend_name == "system"
    # a second ray.init in the same process still carries it (the variable was set here)
    assert console.arrow_pool_everywhere({})["runtime_env"]["env_vars"] == {
        "ARROW_DEFAULT_MEMORY_POOL": "system"
    }


@pytest.mark.parametrize("value", ["jemalloc", "system"])
def test_a_users_choice_wins_and_is_not_sent_twice(fresh_env, value):
    fresh_env.setenv(console.ARROW_POOL_ENV, value)
    assert console.arrow_pool_everywhere({"num_cpus": 1}) == {"num_cpus": 1}


@pytest.mark.integration
def test_ray_workers_allocate_on_the_system_pool(fresh_env):
    import ray

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
