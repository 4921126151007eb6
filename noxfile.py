"""nox: the test suite once per array backend, and lint.

nox                                  # every session
nox -s "tests(backend='numpy')"      # one backend
nox -s lint
nox -s typecheck
nox -s distributed                   # tensor parallelism (4 jax host devices) and Ray
"""

import os
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

BACKENDS = {
    "numpy": [],
    "array_api_strict": ["strict"],
    "jax": ["jax"],
    "torch": ["torch"],
    "cupy": ["cupy"],
}


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("python", "-m", "pip", "install", "-q", "ruff==0.17.6")  # as .pre-commit-config
    paths = ["nanovllm", "tests", "benchmarks", "noxfile.py"]
    session.run("python", "-m", "ruff", "check", *paths)
    session.run("python", "-m", "ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    # the package with its own dependencies (optional backends such as jax and torch are
    # typed as Any where absent); settings in pyproject.toml [tool.mypy]
    session.install("-e", ".", "mypy")
    session.run("mypy")


@nox.session
def distributed(session: nox.Session) -> None:
    # jax pretends to have 4 CPU devices (tensor parallelism at 2 and 4); the Ray tests start a
    # two-node local cluster of their own and stop it
    session.install("-e", ".[test,jax,ray]")
    env = {
        "NANOVLLM_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    tests = ["tests/test_tensor_parallel.py", "tests/test_ray.py"]
    session.run("python", "-m", "pytest", "-q", "-ra", *tests, *session.posargs, env=env)


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    if backend == "cupy" and shutil.which("nvidia-smi") is None:
        session.skip(
            "cupy needs an NVIDIA GPU with its driver (no nvidia-smi here); "
            "benchmarks/gpu_check.sh runs it on a GPU machine"
        )
    extras = ",".join(["test", *BACKENDS[backend]])
    session.install("-e", f".[{extras}]")
    # transformers (torch, OpenMP) and numpy (OpenBLAS) share the process: one thread each
    # keeps them from oversubscribing a small machine, which slows both by 10-100x
    env = {"NANOVLLM_BACKEND": backend, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # one single-threaded pytest-xdist worker per core (at most 4: each holds transformers and
    # its models), a whole test file per worker so that its module fixtures are built once
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    xdist = ["-n", workers, "--dist", "loadfile"]
    session.run("python", "-m", "pytest", "-q", "-ra", *xdist, *session.posargs, env=env)
