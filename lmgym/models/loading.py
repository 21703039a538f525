"""Loading any Hugging Face causal LM and its tokenizer (a hub name or a local folder, checked before
transformers is asked), choosing device and dtype, and tiny models and word tokenizers built offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmgym.utils import checks

__all__ = [
    "is_sharded",
    "is_sharded_module",
    "resolve_device",
    "resolve_dtype",
    "load_model",
    "load_tokenizer",
    "word_tokenizer",
    "tiny_model",
]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is one process's shard of a tensor spread over processes (a DTensor, as FSDP2 makes)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded_module(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) spreads ``model`` or one of its submodules over processes. Asked of the
    modules, not the parameters: between forwards FSDP keeps the root's parameters gathered."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU; anything else goes to ``torch.device``.

    Under a launcher that runs one process per GPU (``torchrun``, ``accelerate launch``: they set
    ``LOCAL_RANK``), ``"auto"`` is this process's own GPU, ``cuda:LOCAL_RANK``.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{int(local_rank)}" if local_rank is not None else "cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA but torch sees no GPU; use device='auto' or 'cpu'")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"`` is float32 on the CPU and bfloat16 on a GPU that supports it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_source(name_or_path: str) -> None:
    """A missing local path must fail with a message about the path, not about the hub."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a hub name or a PreTrainedModel, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model path {name!r} does not exist; pass an existing directory saved with "
                                "save_pretrained(), or a hub name when you are online")


_TOKENIZER_FILES = ("tokenizer*", "vocab*", "*.model", "merges.txt", "special_tokens_map.json")
"""What a folder holding a tokenizer has at least one of (fast, BPE, SentencePiece or tiktoken files)."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False):
    """Load a tokenizer by local path or hub name, with a pad token set (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    trust_remote_code = checks.flag(trust_remote_code, "trust_remote_code")
    _check_source(name_or_path)
    name = os.fspath(name_or_path)
    folder = Path(name).expanduser()
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{name!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): "
                                "save the tokenizer there with tokenizer.save_pretrained(path), or pass tokenizer=")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load a tokenizer from {name!r}: it is not a local directory with complete "
                      f"tokenizer files and could not be fetched from the hub (offline?). ({_first_line(err)})") \
            from err
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # without either, the environment pads with its first stop token
    return tok


def load_model(name_or_path, *, device: str | torch.device = "auto", dtype="auto",
               trust_remote_code: bool = False, tokenizer=None):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a local directory written by ``save_pretrained`` or a hub name
            (hub names need internet), or an already built ``PreTrainedModel``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on GPU), a name or a ``torch.dtype``.
        trust_remote_code: run model code shipped with the checkpoint. Off unless you turn it on.
        tokenizer: a tokenizer object or path; by default loaded from ``name_or_path``.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode on ``device``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, PreTrainedModel

    trust_remote_code = checks.flag(trust_remote_code, "trust_remote_code")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) \
            and not all(hasattr(tokenizer, a) for a in ("decode", "batch_decode", "__call__", "__len__")):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a path to one, or None (the model's own), "
                        f"got {type(tokenizer).__name__}")
    dev = resolve_device(device)
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path
        if dtype != "auto":
            model = model.to(resolve_dtype(dtype, dev))
        model = model.to(dev)
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
    else:
        _check_source(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), dtype=resolve_dtype(dtype, dev),
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load a causal LM from {os.fspath(name_or_path)!r}: it is not a complete local "
                          "model directory (config.json + weights, as save_pretrained writes) and could not be "
                          f"fetched from the hub (offline?). ({_first_line(err)})") from err
        except RuntimeError as err:
            if "mismatch" not in str(err).lower():
                raise
            raise OSError(f"the weights in {os.fspath(name_or_path)!r} do not fit the shapes its config.json gives "
                          "(a vocabulary or hidden size changed after they were saved?); save the model again with "
                          "save_pretrained(), config and weights together") from err
        except (SafetensorError, EOFError) as err:  # a truncated or corrupt weight file
            raise OSError(f"could not read the model weights in {os.fspath(name_or_path)!r}: a weight file is "
                          f"truncated or corrupt ({type(err).__name__}: {_first_line(err)}); save the model again "
                          "with save_pretrained()") from err
        model = model.to(dev)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer or name_or_path, trust_remote_code=trust_remote_code)
    elif tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
                         "they do not belong together")
    return model.eval(), tokenizer


def word_tokenizer(words: list[str], *, eos_token: str = "<eos>"):
    """A whitespace word-level fast tokenizer over ``[eos_token] + words`` (EOS is id 0 and doubles as pad).

    Built with the ``tokenizers`` library, entirely offline; unknown words map to EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(words)) != len(words) or eos_token in words:
        raise ValueError("words must be distinct and must not contain the EOS token")
    vocab = {eos_token: 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos_token))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos_token, pad_token=eos_token,
                                   unk_token=eos_token)


def tiny_model(vocab: list[str] | int = 16, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               max_positions: int = 128, seed: int = 0, init_std: float = 0.02, uniform: bool = False,
               tokenizer=None):
    """Build a small randomly initialised Llama-style LM and a matching tokenizer, offline and deterministically.

    Args:
        vocab: the words of a word-level tokenizer, or a vocabulary size (words ``t1 t2 ...``).
        hidden_size, num_layers, num_heads, max_positions: the model's shape.
        seed: seeds the weight initialisation; the same seed gives the same weights.
        init_std: standard deviation of the initial weights (larger gives peakier next-token distributions).
        uniform: zero the output layer so every next-token distribution is uniform.
        tokenizer: use this tokenizer instead of building a word-level one (its length sets the vocabulary).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU in float32.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        words = [f"t{i}" for i in range(1, vocab)] if isinstance(vocab, int) else list(vocab)
        tokenizer = word_tokenizer(words)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         initializer_range=init_std,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only; the caller's RNG state is kept
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return model.eval(), tokenizer

