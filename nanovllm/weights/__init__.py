"""Weight loaders: a Hugging Face directory (config.json + safetensors) or a GGUF file."""

from ..errors import WeightsError
from .gguf_file import GGUF_ARCHS, GGUFArch, load_gguf
from .gguf_tokenizer import GGUFTokenizerData
from .safetensors_dir import load_hf_dir

__all__ = [
    "GGUF_ARCHS",
    "GGUFArch",
    "GGUFTokenizerData",
    "WeightsError",
    "load_gguf",
    "load_hf_dir",
]
