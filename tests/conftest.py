import os
import tempfile

import pytest

# The suite runs on two pytest-xdist workers (`make test`). Each test module goes to one
# worker whole, so its module- and session-scoped fixtures (a prepared store, a tiny sweep)
# are built once; modules sharing a session fixture go together.
SHARED_FIXTURES = {"test_sweep": "tiny-sweep", "test_export": "tiny-sweep"}

# The longest modules go first, so the two workers do not end on one long module while the
# other idles (times per module: docs/testing.md). `--no-loadscope-reorder` keeps this
# order; xdist would otherwise hand out the modules with the most tests first.
LONGEST_FIRST = ["test_end_to_end", "test_refresh", "test_concurrent_runs", "test_training_resume",
                 "test_benchmarks", "test_s3_store", "test_sweep", "test_export", "test_extending",
                 "test_pool_resume", "test_gpu_check", "test_pool_cli", "test_out_of_core"]


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: without xdist, never called
def pytest_xdist_make_scheduler(config, log):
    # xdist's own `--dist loadgroup` marks groups by rewriting each item's node id, which
    # pytest 9.2 no longer reads (it keeps the id elsewhere): a scheduler of our own says
    # which tests go together instead.
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = module_of(nodeid)
            return SHARED_FIXTURES.get(module, module)

    return ModuleScheduling(config, log)


def pytest_configure(config):
    # Two xdist workers each start local Ray instances: each gets a temp folder of its own
    # (sessions, sockets, spill), inherited by the CLI runs it starts. Ray's ports are
    # already chosen free per instance. The folder is short: Ray's socket paths are limited.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{worker}-", dir="/tmp")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module_of(item.nodeid), len(rank)))  # stable: file order otherwise


@pytest.fixture(autouse=True)
def no_ray_left_running(request):
    """A test that starts Ray in the pytest process and leaves it running breaks whichever
    test of that worker next asks for ``ray_local`` ("called ray.init twice"), depending on
    how xdist happened to order the modules: fail the test that did it, by name, instead."""
    import sys

    def ray_up() -> bool:  # never imports Ray for a test that did not
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    was_up = ray_up()
    yield
    if not was_up and "ray_local" not in request.fixturenames and ray_up():
        sys.modules["ray"].shutdown()
        pytest.fail("left a Ray instance running in the pytest process: use the ray_local fixture, "
                    "or run the driver in a subprocess")


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
