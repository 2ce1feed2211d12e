import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the tests that need it (loopback, no dashboard)."""
    import ray

    # Workers import test modules by name (functions defined in tests), as pytest does.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.path.dirname(tests_dir), tests_dir])}})
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()



@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """The tiny sweep of ``sweephelpers`` on a store of the session's own."""
    from sweephelpers import TinySweep

    return TinySweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="session")
def finished_sweep(tiny_sweep):
    """(the sweep, its first run's CompletedProcess): shared by the sweep tests and the
    export tests, which export its trials' models."""
    return tiny_sweep, tiny_sweep.run()
