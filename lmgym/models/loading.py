"""Loading causal language models, and stepping them over a batch with a KV cache.

Everything here works on any Hugging Face causal LM. The batched stepping keeps
prompts *left-padded* in the cache (as ``model.generate`` does), so that every
row's newest token sits in the last column and a prefill needs only the last
position's logits. Rows may be re-prefilled independently (a vector environment
resets episodes one at a time); their new keys and values are written into the
rightmost columns and the columns before are masked out, which is exact because
a cached key/value does not depend on the column it is stored in, only on the
position id it was computed with (:mod:`lmgym.models.kv_cache` does this column surgery
for full and sliding-window attention caches).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from lmgym.utils import checks, fast_paths
from lmgym.models import kv_cache
from lmgym.models.hf_api import accepts_logits_to_keep, cache_kwargs, cache_of, hf_model

__all__ = [
    "is_sharded",
    "is_sharded_module",
    "resolve_device",
    "resolve_dtype",
    "load_model",
    "load_tokenizer",
    "word_tokenizer",
    "tiny_model",
    "CachedLM",
    "token_logprobs",
    "sample_continuations",
    "to_left_padded",
    "left_pad",
    "right_pad",
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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], computed in float32 without materialising the whole log-softmax."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _padded(sequences, pad, device, width: int | None, dtype: torch.dtype, left: bool):
    """``(values, mask)`` ``(len(sequences), width)``: each sequence at the right (``left``) or left end of its row.

    Built on the host in a few vectorised calls (no per-row copy) and moved to ``device`` once.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {longest} entries does not fit in width {width}")
    values = torch.full((len(sequences), width), pad, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    flat = torch.tensor([v for s in sequences for v in s], dtype=dtype)
    rows = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths  # where each sequence begins in ``flat``
    columns = torch.arange(len(flat)) - torch.repeat_interleave(starts, lengths)
    if left:
        columns += torch.repeat_interleave(width - lengths, lengths)
    values[rows, columns] = flat
    mask[rows, columns] = 1
    return values.to(device), mask.to(device)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists left-padded: ``(ids, mask)``, both ``(len(sequences), longest)``."""
    return _padded(sequences, pad_id, device, None, torch.long, left=True)


def right_pad(sequences, pad, device, *, width: int | None = None,
              dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack lists (token ids, or log-probs with ``dtype=torch.float32``) right-padded with ``pad``: ``(values,
    mask)``, both ``(len(sequences), width)`` (default: the longest), ``mask`` 1 where a value was given."""
    return _padded(sequences, pad, device, width, dtype, left=False)


def to_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int | None = None):
    """Turn lmgym's left-aligned observations into the left-padded layout ``generate`` expects (no host sync).

    ``width`` keeps only the last ``width`` columns (an upper bound on the tokens per row,
    e.g. the environment's ``max_prompt_tokens`` right after a reset), so no model runs
    over columns that are padding in every row.
    """
    # A stable sort on the mask moves padding (0) to the front and keeps token order.
    order = torch.sort(attention_mask.to(torch.int8), dim=1, stable=True).indices
    if width is not None:
        order = order[:, -width:]
    return input_ids.gather(1, order), attention_mask.gather(1, order).long()


class CachedLM:
    """A batch of token sequences fed to a causal LM incrementally, with a KV cache.

    It holds, per row, the cache of everything fed so far and the log-probabilities
    of the *next* token (``next_logprobs``, ``(batch, vocab)`` float32). Rows can be
    restarted on new prompts independently with :meth:`restart_rows`.

    The cache is left-padded: every row's tokens form one contiguous block ending at
    the last column (see :mod:`lmgym.models.kv_cache`, which edits the columns of full- and
    sliding-window-attention caches). For models whose cache cannot be edited per
    column (recurrent layers, chunked attention) a partial restart re-prefills every
    row from the tokens it holds instead: slower, equally exact.

    Args:
        model: a Hugging Face causal LM (kept frozen; gradients are never taken).
        max_sequence_length: the longest prompt + continuation a row can hold. The
            cache is compacted when it grows to twice this, bounding memory under
            endless resets.
    """

    def __init__(self, model, *, max_sequence_length: int):
        self.model = model
        self.max_sequence_length = max_sequence_length
        self._keep_last = accepts_logits_to_keep(model)
        if not self._keep_last:
            fast_paths.fall_back("logits_to_keep", f"{type(hf_model(model)).__name__}.forward takes no logits_to_keep")
        self.cache = None
        self.mask: torch.Tensor | None = None  # (batch, cache columns) 1 where a column is a real token
        self.ids: torch.Tensor | None = None  # (batch, cache columns) the token in each column
        self.lengths: torch.Tensor | None = None  # (batch,) tokens fed per row = next position id
        self.next_logprobs: torch.Tensor | None = None
        self._editable = True  # whether the cache layout allows per-column edits (known after the first prefill)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, ids, mask, position_ids, cache, last_only: bool):
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                      **cache_kwargs(self.model, cache))
        if last_only and self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]]):
        ids, mask = left_pad(prompts, 0, self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._forward(ids, mask, positions, None, last_only=True)
        next_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return cache_of(out), ids, mask, mask.sum(1), next_lp

    def start(self, prompts: list[list[int]]) -> None:
        """Forget everything and prefill one prompt per row."""
        self.cache, self.ids, self.mask, self.lengths, self.next_logprobs = self._prefill(prompts)
        self._editable = kv_cache.editable(self.cache, self.model.config)
        if not self._editable:
            fast_paths.fall_back("cache column edits", f"{type(hf_model(self.model)).__name__}'s KV cache "
                                 f"({kv_cache.describe(self.cache)}) cannot be edited per column")

    def sequences(self) -> list[list[int]]:
        """The tokens fed to each row so far (prompt and continuation)."""
        return [row[m].tolist() for row, m in zip(self.ids.cpu(), self.mask.cpu().bool())]  # one copy to the host

    @torch.no_grad()
    def restart_rows(self, rows: torch.Tensor, prompts: list[list[int]]) -> None:
        """Prefill new prompts into the given rows (a long tensor of row indices), keeping the other rows."""
        if not self._editable:
            sequences = self.sequences()
            for r, p in zip(rows.tolist(), prompts):
                sequences[r] = list(p)
            self.start(sequences)
            return
        cache, ids, mask, lengths, next_lp = self._prefill(prompts)
        width = mask.shape[1]
        if width > self.mask.shape[1]:
            extra = width - self.mask.shape[1]
            kv_cache.grow_left(self.cache, extra)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1)
            self.ids = torch.cat([self.ids.new_zeros(self.ids.shape[0], extra), self.ids], dim=1)
        total = self.mask.shape[1]
        kv_cache.write_right(self.cache, rows, cache)
        row_mask = torch.zeros((len(prompts), total), dtype=self.mask.dtype, device=self.mask.device)
        row_mask[:, total - width:] = mask
        row_ids = torch.zeros((len(prompts), total), dtype=self.ids.dtype, device=self.ids.device)
        row_ids[:, total - width:] = ids
        self.mask[rows] = row_mask
        self.ids[rows] = row_ids
        self.lengths[rows] = lengths
        self.next_logprobs[rows] = next_lp

    def _compact(self) -> None:
        """Drop the columns left of the longest row (every row's block ends at the last column)."""
        drop = self.mask.shape[1] - self.max_sequence_length
        kv_cache.drop_left(self.cache, drop)
        self.mask, self.ids = self.mask[:, drop:], self.ids[:, drop:]

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row; returns (and stores) the next-token log-probs ``(batch, vocab)``.

        ``live`` (bool ``(batch,)``) marks the rows that take their token; the others are
        about to be restarted by the caller: they get a masked placeholder column at
        position 0 (their own position may already be the last one the model has) and
        are undefined until :meth:`restart_rows`.
        """
        if self.mask.shape[1] >= 2 * self.max_sequence_length:
            self._compact()
        column = self.mask.new_ones(self.mask.shape[0], 1) if live is None else live[:, None].to(self.mask.dtype)
        positions = self.lengths if live is None else torch.where(live, self.lengths, 0)
        self.mask = torch.cat([self.mask, column], dim=1)
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids.dtype)], dim=1)
        out = self._forward(tokens[:, None], self.mask, positions[:, None], self.cache, last_only=True)
        self.cache = cache_of(out)
        self.lengths = self.lengths + (1 if live is None else live.long())
        self.next_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return self.next_logprobs

    @torch.no_grad()
    def score_continuations(self, tokens: torch.Tensor, sampling=None) -> torch.Tensor:
        """Log-probs ``(batch, T)`` of whole continuations ``tokens`` ``(batch, T)`` of the current rows.

        One forward over the continuations on top of the cached prompts. The
        cache itself is left as it was (rows are expected to restart next). With a
        :class:`lmgym.models.sampling.Sampling`, the log-probs are those of the model's
        distribution under that sampling transformation.
        """
        if sampling is not None and sampling.is_identity:
            sampling = None
        first_lp = self.next_logprobs if sampling is None else sampling.log_probs(self.next_logprobs)[0]
        first = first_lp.gather(1, tokens[:, :1])
        if tokens.shape[1] == 1:
            return first
        steps = tokens.shape[1] - 1
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], steps)], dim=1)
        positions = self.lengths[:, None] + torch.arange(steps, device=tokens.device)
        cache = _copy_cache(self.cache) if self._editable else copy.deepcopy(self.cache)
        out = self._forward(tokens[:, :-1], mask, positions, cache, last_only=False)
        rest = (token_logprobs(out.logits, tokens[:, 1:]) if sampling is None
                else sampling.token_log_probs(out.logits, tokens[:, 1:]))
        return torch.cat([first, rest], dim=1)


def _copy_cache(cache):
    """A shallow copy whose layers can grow without touching the original tensors."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


@torch.no_grad()
def sample_continuations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                         stop_token_ids, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None, check_every: int = 8,
                         mask_model=None, mask_fn=None, noise_share: tuple[int, int] | None = None,
                         all_finished=None):
    """Sample continuations of left-padded prompts with a KV cache.

    Args:
        model: the policy LM.
        input_ids, attention_mask: left-padded prompts ``(batch, P)``.
        max_new_tokens: most tokens to sample per row.
        stop_token_ids: a row stops after emitting one of these; later slots hold ``pad_token_id``.
        temperature, top_k, top_p: the sampling transformation (see :class:`lmgym.models.sampling.Sampling`);
            the defaults sample the model's own distribution.
        generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
        check_every: look at whether every row has stopped only every this many tokens,
            to avoid a host round-trip per token.
        mask_model, mask_fn: optionally a second LM stepped in lock-step with its own KV cache, and
            ``mask_fn(its next-token logits) -> (batch, vocab) bool``: each token is drawn from the
            sampling distribution restricted to that mask and renormalised (NLPO's masking policy).
        noise_share, all_finished: for one process's share of a data-parallel batch: ``(k, K)`` draws
            the random noise of all K shares and keeps the k-th (see :meth:`lmgym.models.sampling.Sampling.sample`),
            and ``all_finished(finished) -> bool`` says whether every row of *every* share has
            stopped, so all processes take the same number of steps (and random draws) as one process would.

    Returns:
        ``(tokens, logprobs)``, both ``(batch, T)`` with ``T <= max_new_tokens``; ``logprobs``
        are the log-probs of the chosen tokens under the distribution actually sampled from
        (tempered and truncated), 0 after a row stopped.
    """
    from lmgym.models.sampling import Sampling

    sampling = Sampling(temperature, top_k, top_p)
    device = input_ids.device
    stop = torch.as_tensor(list(stop_token_ids), device=device)
    batch = input_ids.shape[0]
    mask = attention_mask
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    models = [model] if mask_model is None else [model, mask_model]
    caches, logits = [], []
    for m in models:
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(m) else {}
        if not keep:
            fast_paths.fall_back("logits_to_keep", f"{type(hf_model(m)).__name__}.forward takes no logits_to_keep")
        out = m(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
        caches.append(cache_of(out))
        logits.append(out.logits[:, -1])
    lengths = mask.sum(1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        allowed = mask_fn(logits[1]) if mask_model is not None else None
        tok, lp = sampling.sample(logits[0], generator, allowed=allowed, noise_share=noise_share)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        logprobs.append(torch.where(finished, torch.zeros_like(lp), lp))
        finished = finished | torch.isin(tok, stop)
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and (
                bool(finished.all()) if all_finished is None else all_finished(finished))):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        for i, m in enumerate(models):
            out = m(input_ids=tok[:, None], attention_mask=mask, position_ids=lengths[:, None],
                    use_cache=True, **cache_kwargs(m, caches[i]))
            caches[i], logits[i] = cache_of(out), out.logits[:, -1]
        lengths = lengths + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
