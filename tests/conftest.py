"""Shared fixtures: tiny configs that compile in seconds on 2 CPU cores."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """A JAX compilation cache for this session's command-line subprocesses (they inherit os.environ): each
    would otherwise recompile the same tiny models, ~8 s apiece on 2 CPU cores. Fresh per session, so a test
    never reads an executable compiled by other code."""
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_cache"),
             # Cache every executable, however quick or small: the tiny test models compile in under a second.
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    os.environ.update(cache)
    yield
    for key in cache:
        os.environ.pop(key, None)


# Results computed in different batch shapes, device counts or programs (another jit, an export) differ by
# float32 reassociation: XLA:CPU's kernels sum in an order that depends on the shapes and on the machine's vector
# width (AVX2 against AVX-512: 2.3e-6 apart on a probability of 0.6). Exact comparisons are kept for the same
# program on the same inputs.
REASSOCIATION = {"rtol": 1e-5, "atol": 1e-6}


def tiny_config(source="synthetic", variant="owt", **overrides):
    """base_config() shrunk for tests: 1/16 width, 64 px, batch 16, 4 steps, constant learning rate."""
    from alexnet_jax.config import base_config

    c = base_config()
    c.model.variant = variant
    c.model.num_classes = 10
    c.model.width = 0.0625
    c.data.source = source
    c.data.image_size = 64
    c.data.resize_size = 64
    c.data.synthetic_examples = 64
    c.batch_size = 16
    c.num_train_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 100
    c.optim.learning_rate = 0.01
    c.optim.schedule = "constant"
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def loopback_namespace_unavailable(*modules: str) -> str | None:
    """Why a test cannot run in a network namespace holding only loopback (`unshare -n`, then `lo` up), where
    nothing but 127.0.0.1 can be reached (no metadata server, no bucket), or None when it can."""
    import importlib.util
    import shutil

    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip (util-linux, iproute2) for a loopback-only network namespace"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here (needs root or user namespaces): {probe.stderr.strip()}"
    return None


def run_cli(module, *args, env=None, timeout=600):
    """Runs `python -m module args` from the repo root; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny():
    return tiny_config


def random_model_vars(model_config, seed=0):
    """Random params *and* BatchNorm statistics far from their initial values, so a test notices if either is
    dropped or mixed up on the way (checkpoint, export, inference)."""
    import jax
    import numpy as np

    from alexnet_jax import models

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
        if "scale" in name:
            return (rng.standard_normal(leaf.shape) + 1.0).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.1).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, models.abstract_model_vars(model_config))
