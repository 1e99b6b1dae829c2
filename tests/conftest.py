"""Test set-up: four fake CPU devices (for pmap tests) and no network.

XLA_FLAGS must be set before jax is first imported, which is why it lives here.
"""

import gc
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops every compiled program after each test module. XLA:CPU maps memory for each
    executable's code, and the whole suite's programs kept alive together exceed the
    kernel's limit of 65,530 mappings per process (vm.max_map_count), after which the
    next compilation crashes the process."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
