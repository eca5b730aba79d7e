"""Test set-up: 8 simulated CPU devices for everything sharded.

XLA reads its flags once, when the backend starts, so they are set here, before any test
module runs jax; subprocesses (the preemption and multi-process tests) inherit them.
"""

import os
import shutil
import tempfile
import uuid

import chex

# XLA:CPU aborts the process when a collective waits too long for its peers; on a loaded
# 2-core CI machine, 8 simulated devices per test process can exceed the default.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_cpu_collective_timeout_seconds=1200",
        "--xla_cpu_collective_call_terminate_timeout_seconds=1200",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gcsfs decides on import whether to ask a gRPC service (which the GCS emulator lacks) if a
# bucket is zonal; clip_jax.storage turns that off only when the emulator is set before the
# import, and a test may resolve a gs:// path without the emulator first.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent compilation cache per test run, shared by both xdist workers and the
# training subprocesses they start: dozens of runs compile the same demo step (a cold cache
# took the preemption, resume and train tests from 303 s to 214 s). Per run, so that no run
# depends on what an earlier one left.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
_OWN_CACHE = None  # the cache this process made (a user's own is kept)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.path.join(tempfile.gettempdir(), f"clip_jax_tests_{_RUN}")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
chex.set_n_cpu_devices(8)  # through XLA_FLAGS too, so subprocesses see the same devices

import jax  # noqa: E402
import local_servers  # noqa: E402
import one_process  # noqa: E402
import pytest  # noqa: E402
import two_processes  # noqa: E402

from clip_jax import train as train_lib  # noqa: E402
from clip_jax.data.prepare import prepare_demo  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A small clip_demo (640 train pairs at 32 px), built once per test process."""
    d = str(tmp_path_factory.mktemp("demo_tfds"))
    prepare_demo(d, num_train=640, num_validation=48, num_test=40, image_size=32, verbose=False)
    return d


@pytest.fixture(scope="session")
def reference(demo_data_dir, tmp_path_factory):
    """Per-step losses and final parameters of the uninterrupted `one_process` run, shared
    by the tests that interrupt and resume it (preemption, cloud storage)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    c = one_process.config(demo_data_dir)
    train_lib.train(c, workdir)
    return one_process.losses_by_step(workdir), one_process.final_params(c, workdir)


@pytest.fixture(scope="session")
def two_process_run(demo_data_dir, tmp_path_factory):
    """The workdir of an uninterrupted 2-process run (`two_processes`), shared as a reference."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    two_processes.finish(two_processes.start(workdir, demo_data_dir))
    return workdir


@pytest.fixture(scope="session")
def gcs_url():
    """The GCS emulator, one per test process: gcsfs and etils keep the clients they made,
    endpoint included, for the whole process."""
    port = local_servers.free_port()
    server = local_servers.start_gcs(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs(gcs_url, monkeypatch):
    """This process and its subprocesses talk to the emulator (the standard variable only)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    for derived in ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        monkeypatch.delenv(derived, raising=False)
    return gcs_url


def pytest_sessionfinish(session):
    """The run's compilation cache goes with it (the xdist controller, or a run without
    workers, removes it once every worker is done)."""
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
