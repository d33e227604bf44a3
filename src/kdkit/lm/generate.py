"""Continuations of prompts by a causal language model, and sequence-level distillation data.

Everything here follows the text contract: a batch of token ids is a LongTensor (B, L), right-padded with
the model's ``pad_token_id``; a causal LM maps it to logits (B, L', V) with ``L' <= L``; the targets ``y`` are
aligned with the ids (``y[:, t]`` is the token position ``t`` must predict, ``x[:, t + 1]``) and ``-100``
where nothing is predicted (prompt tokens, padding, the last position).

- :func:`prompt_lengths` reads where each row's prompt ends from its targets (the first predicted position).
- :func:`generate` samples (or greedily picks) up to ``max_new_tokens`` tokens after each prompt and returns
  ids and targets in the contract's form, the targets masking the prompt, so a batch of generated text is
  a drop-in replacement for a batch of data (on-policy distillation, Agarwal et al. 2024).
- :func:`sequence_kd_data` builds the training set of sequence-level distillation (Kim & Rush 2016): the
  teacher's continuations of the training prompts, generated once and cached on disk under a fingerprint of
  the teacher's weights, the prompts and the generation settings.

Randomness comes only from the ``torch.Generator`` passed in (or one seeded from ``seed``): the global RNG
is never touched, so generating inside a training step does not shift the run's other random streams.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..errors import KdkitError

IGNORE = -100  # the contract's "nothing to predict here"


@dataclass(frozen=True)
class GenerationConfig:
    """How continuations are drawn.

    Attributes:
        max_new_tokens: tokens generated after each prompt (fewer when ``eos_token_id`` comes first).
        temperature: sampling temperature; 0 picks the most likely token (greedy).
        top_p: nucleus sampling (Holtzman et al. 2020): sample among the most likely tokens whose total
            probability first reaches ``top_p``; 1 samples from the whole distribution.
        eos_token_id: a token that ends a continuation (kept, then padding), or None.
        max_length: a cap on prompt + continuation length (a model's context size), or None.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: Optional[int] = None
    max_length: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise KdkitError(f"max_new_tokens must be >= 1; given {self.max_new_tokens}")
        if self.temperature < 0:
            raise KdkitError(f"generation temperature must be >= 0 (0 = greedy); given {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise KdkitError(f"top_p must be in (0, 1]; given {self.top_p}")
        if self.max_length is not None and self.max_length < 2:
            raise KdkitError(f"max_length must be >= 2; given {self.max_length}")


@dataclass
class Generated:
    """Prompts with their continuations, in the contract's form.

    Attributes:
        x: (B, L) ids, right-padded with the pad id: each row's prompt, then its generated tokens.
        y: (B, L) targets: ``x[:, t + 1]`` on the generated tokens' positions, ``-100`` on the prompt and padding.
        prompt_lengths: (B,) real prompt tokens per row.
        lengths: (B,) real tokens per row (prompt + generated, the eos token included).
    """

    x: torch.Tensor
    y: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor


def prompt_lengths(y: torch.Tensor, x: torch.Tensor, pad_token_id: int, default: int = 1) -> torch.Tensor:
    """Where each row's prompt ends, read from its targets: the prompt is ``x[i, :p_i]``.

    The first position with a target, ``t0``, predicts ``x[t0 + 1]``, so the prompt is the tokens up to and
    including ``t0``: ``p_i = t0 + 1``. A row of plain text (targets from position 0 on) therefore has a
    one-token prompt; ``default`` sets a longer one for such rows (clipped to the row's real length). A row
    with no target at all gets its whole real length as the prompt.

    Args:
        y: (B, L) targets (-100 where nothing is predicted).
        x: (B, L) ids, right-padded with ``pad_token_id``.
        pad_token_id: the padding id.
        default: prompt length used for rows whose targets start at position 0.

    Returns:
        (B,) int64 prompt lengths, each in [1, real length].
    """
    if x.shape != y.shape:
        raise KdkitError(f"ids and targets differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; expected y aligned "
                         "with x (y[:, t] = x[:, t + 1])")
    real = (x != pad_token_id).sum(dim=1)  # (B,)
    has = y != IGNORE
    first = torch.where(has.any(dim=1), has.to(torch.int8).argmax(dim=1), real - 1)  # (B,)
    p = first + 1
    p = torch.where(first == 0, torch.full_like(p, max(1, default)), p)
    return torch.minimum(p, real).clamp_min(1)


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """One next token per row from (B, V) logits: greedy, or sampled at the temperature within the top-p nucleus."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= cfg.top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: torch.Tensor, lengths: torch.Tensor, pad: int):
    """Right-padded prompts (B, P) to left-padded ids, attention mask and position ids (for a KV cache)."""
    b, width = prompts.shape[0], int(lengths.max())
    cols = torch.arange(width, device=prompts.device)
    shift = width - lengths  # (B,) pad columns on the left
    mask = cols[None, :] >= shift[:, None]  # (B, W)
    src = (cols[None, :] - shift[:, None]).clamp(min=0)
    ids = torch.where(mask, prompts.gather(1, src), torch.full((b, width), pad, device=prompts.device))
    positions = (cols[None, :] - shift[:, None]).clamp(min=0)
    return ids, mask.long(), positions


def _hf_steps(model: nn.Module, prompts: torch.Tensor, lengths: torch.Tensor, steps: int, cfg: GenerationConfig,
              generator: torch.Generator, pad: int, total: int) -> torch.Tensor:
    """(B, steps) new tokens from a wrapped Hugging Face model, with its key/value cache (prompts left-padded).

    Positions are capped at ``total - 1`` (the model's context may end there): a row past its cap produces
    tokens that the caller drops, and causal attention keeps them from reaching the other rows."""
    ids, mask, positions = _left_pad(prompts, lengths, pad)
    out = model.hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    new = []
    next_pos = lengths.clamp(max=total - 1)  # (B,) position of the token being generated
    for step in range(steps):
        token = _pick(out.logits[:, -1, :], cfg, generator)  # (B,)
        new.append(token)
        if step + 1 == steps:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model.hf(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=out.past_key_values, use_cache=True)
        next_pos = (next_pos + 1).clamp(max=total - 1)
    return torch.stack(new, dim=1)


def _plain_steps(model: nn.Module, buf: torch.Tensor, lengths: torch.Tensor, steps: int, cfg: GenerationConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """(B, steps) new tokens from any contract model: the whole right-padded sequence is re-run every step.

    A causal model's logits at the last real position of a row depend only on the tokens before it, so the
    padding after a shorter row changes nothing."""
    rows = torch.arange(buf.shape[0], device=buf.device)
    total = buf.shape[1] - 1  # the last column is scratch space for rows already at the length cap
    new = []
    cur = lengths.clone()
    for _ in range(steps):
        width = int(cur.max())
        logits = model(buf[:, :width])  # (B, L', V), L' >= every row's real length
        token = _pick(logits[rows, cur - 1], cfg, generator)
        new.append(token)
        buf[rows, cur] = token  # provisional: the caller drops what follows an eos or passes the cap
        cur = (cur + 1).clamp(max=total)  # a row at the cap keeps re-reading its last position (discarded)
    return torch.stack(new, dim=1)


def _same_on_every_rank(model: nn.Module, steps: int) -> int:
    """A model sharded with FSDP gathers its parameters in every forward, on every rank together: all ranks then
    take the largest number of steps any of them needs (the extra tokens are dropped like any past the cap)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return steps
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return steps
    t = torch.tensor([steps], device=next(model.parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def generate(model: nn.Module, prompts: torch.Tensor, lengths: Optional[torch.Tensor] = None,
             config: Optional[GenerationConfig] = None, *, generator: Optional[torch.Generator] = None,
             seed: Optional[int] = None, use_cache: bool = True, **options) -> Generated:
    """Continue each prompt with up to ``max_new_tokens`` tokens drawn from ``model``.

    The model runs in eval mode (no dropout) without gradients; its training flag is restored after. A model
    that wraps a Hugging Face causal LM at ``.hf`` generates with its key/value cache (prompts left-padded,
    position ids shifted); any other contract model re-runs the growing sequence. The two give the same
    tokens (up to float rounding in sampled probabilities).

    Args:
        model: a causal LM following the text contract (``forward(ids) -> (B, L', V)``, ``pad_token_id``).
        prompts: (B, P) prompt ids, right-padded with the pad id.
        lengths: (B,) real prompt tokens per row; default: the non-pad tokens of each row.
        config: a :class:`GenerationConfig`; or give its fields as keyword ``options``.
        generator: the source of randomness for sampling (the global RNG is never used).
        seed: seeds a fresh generator when ``generator`` is None (default 0).
        use_cache: use the key/value cache of a wrapped Hugging Face model.

    Returns:
        :class:`Generated`: ids (B, L) and targets (B, L), ``L = max prompt length + max_new_tokens`` (capped
        at ``max_length``); the targets are -100 on every prompt and padding position.
    """
    cfg = config if config is not None else GenerationConfig(**options)
    if config is not None and options:
        raise KdkitError(f"give either a GenerationConfig or its fields, not both (extra: {sorted(options)})")
    pad = getattr(model, "pad_token_id", None)
    if pad is None:
        raise KdkitError(f"{type(model).__name__} has no pad_token_id; expected a causal LM following the text "
                         "contract (kdkit.lm.HFCausalLM)")
    if prompts.dim() != 2 or prompts.dtype != torch.long:
        raise KdkitError(f"prompts must be a (B, P) LongTensor of token ids; given {prompts.dtype} of shape "
                         f"{tuple(prompts.shape)}")
    lengths = (prompts != pad).sum(dim=1) if lengths is None else lengths.to(prompts.device)
    if bool((lengths < 1).any()):
        raise KdkitError("every prompt needs at least one real token; a row is all padding")
    total = int(lengths.max()) + cfg.max_new_tokens
    if cfg.max_length is not None:
        total = min(total, cfg.max_length)
    steps = total - int(lengths.min())  # tokens the shortest prompt may still take
    steps = min(steps, cfg.max_new_tokens)
    if steps < 1:
        raise KdkitError(f"prompts of {int(lengths.min())} tokens leave no room under max_length {cfg.max_length}")
    steps = _same_on_every_rank(model, steps)
    if generator is None:
        generator = torch.Generator(device=prompts.device).manual_seed(0 if seed is None else seed)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            buf = torch.full((prompts.shape[0], total + 1), pad, dtype=torch.long, device=prompts.device)
            width = min(prompts.shape[1], total)
            buf[:, :width] = prompts[:, :width]
            if use_cache and hasattr(model, "hf"):
                new = _hf_steps(model, prompts, lengths, steps, cfg, generator, pad, total)
            else:
                new = _plain_steps(model, buf, lengths, steps, cfg, generator)
    finally:
        model.train(was_training)
    return _assemble(prompts, lengths, new, total, cfg, pad)


def _assemble(prompts: torch.Tensor, lengths: torch.Tensor, new: torch.Tensor, total: int, cfg: GenerationConfig,
              pad: int) -> Generated:
    """Right-padded ids and targets from prompts and the new tokens: cut at eos (kept) and at ``total``."""
    b, steps = new.shape
    dev = prompts.device
    keep = torch.ones_like(new, dtype=torch.bool)
    if cfg.eos_token_id is not None:
        is_eos = new == cfg.eos_token_id
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
        keep &= ~after_eos
    room = (total - lengths).clamp(min=0)  # (B,) tokens a row may add under max_length
    keep &= torch.arange(steps, device=dev)[None, :] < room.clamp(max=cfg.max_new_tokens)[:, None]
    n_new = keep.sum(dim=1)  # (B,) kept tokens are a prefix of each row
    x = torch.full((b, total), pad, dtype=torch.long, device=dev)
    cols = torch.arange(total, device=dev)[None, :]
    in_prompt = cols < lengths[:, None]
    width = min(prompts.shape[1], total)
    x[:, :width] = torch.where(in_prompt[:, :width], prompts[:, :width], x[:, :width])
    rel = cols - lengths[:, None]  # (B, total) index into the new tokens
    is_new = (rel >= 0) & (rel < n_new[:, None])
    x = torch.where(is_new, new.gather(1, rel.clamp(0, steps - 1)), x)
    ends = lengths + n_new
    y = torch.full_like(x, IGNORE)
    # position t predicts x[t + 1] for t from the last prompt token to the one before the last real token
    predicted = (cols >= lengths[:, None] - 1) & (cols < ends[:, None] - 1)
    y[:, :-1] = torch.where(predicted[:, :-1], x[:, 1:], y[:, :-1])
    return Generated(x=x, y=y, prompt_lengths=lengths.clone(), lengths=ends)


# ----------------------------------------------------------------------------- sequence-level KD (Kim & Rush 2016)

def _fingerprint(teacher: nn.Module, prompts: torch.Tensor, lengths: torch.Tensor, cfg: GenerationConfig,
                 seed: int, batch_size: int) -> str:
    from ..teacher.cache import fingerprint_model

    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint_model(teacher).encode())
    for t in (prompts, lengths):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps({**asdict(cfg), "seed": seed, "batch_size": batch_size}, sort_keys=True).encode())
    return h.hexdigest()


def sequence_kd_data(teacher: nn.Module, x, y: Optional[torch.Tensor] = None, *,
                     config: Optional[GenerationConfig] = None, seed: int = 0, batch_size: int = 64,
                     prompt_tokens: int = 1, cache_dir: Optional[Union[str, Path]] = None, **options):
    """The training set of sequence-level KD (Kim & Rush 2016): the teacher's continuations of the prompts.

    Each row's prompt is read from the data (``y``, see :func:`prompt_lengths`; rows of plain text take their
    first ``prompt_tokens`` tokens), and the teacher continues it (greedy with ``temperature=0``, Kim & Rush's
    beam-search approximation, or sampled). The student is then trained on the result with cross-entropy
    (method ``supervised``-style, or ``lm_kd`` to add a divergence): the targets mask the prompts.

    Continuations end at the data's end-of-text token (``eos_token_id`` of token data) unless the generation
    settings name one. Generated once: with ``cache_dir`` the result is saved as
    ``seqkd-<fingerprint>.safetensors`` and reused while the teacher's weights, the prompts and the generation
    settings (and seed, batch size) are the same.

    Args:
        teacher: a causal LM following the text contract.
        x: (N, L) training ids, or token data (``kdkit.lm.data.TokenData``, whose ``x`` and ``y`` are used);
        y: their (N, L) targets (None: plain text, every token a target).
        config: generation settings (or their fields as ``options``); the default: 32 tokens, greedy.
        seed: seeds the sampling (one generator for the whole set, batches in order).
        batch_size: prompts per generation batch (the result depends on it only through float rounding).
        prompt_tokens: prompt length for rows of plain text.
        cache_dir: where to keep the generated set, or None to keep nothing.

    Returns:
        :class:`kdkit.lm.data.TokenData` with the teacher's sequences as ``x`` and their targets as ``y`` (pad
        id the teacher's; eos and tokenizer path taken from ``x`` when it is token data).
    """
    from .data import TokenData

    if config is None:
        options.setdefault("temperature", 0.0)  # greedy: the nearest to the paper's beam search
    cfg = config if config is not None else GenerationConfig(**options)
    pad = getattr(teacher, "pad_token_id", None)
    if pad is None:
        raise KdkitError(f"{type(teacher).__name__} has no pad_token_id; expected a causal LM following the text "
                         "contract (kdkit.lm.HFCausalLM)")
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(x, "eos_token_id", None)
    if cfg.eos_token_id is None and eos is not None:  # the data's end-of-text ends the teacher's continuations
        cfg = replace(cfg, eos_token_id=eos)
    tokenizer_path = getattr(x, "tokenizer_path", None)
    if hasattr(x, "x"):  # token data given whole: its ids and targets
        x, y = x.x, x.y if y is None else y

    def token_data(ids: torch.Tensor, targets: torch.Tensor) -> TokenData:
        return TokenData(ids, targets, pad, eos, tokenizer_path)

    if y is None:
        y = torch.full_like(x, IGNORE)
        y[:, :-1] = torch.where(x[:, 1:] != pad, x[:, 1:], IGNORE)
    lengths = prompt_lengths(y, x, pad, default=prompt_tokens)
    width = int(lengths.max())
    prompts = torch.where(torch.arange(width)[None, :] < lengths[:, None], x[:, :width], pad)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"seqkd-{_fingerprint(teacher, prompts, lengths, cfg, seed, batch_size)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            saved = load_file(str(path))
            return token_data(saved["x"], saved["y"])
    ids, targets = _continue_all(teacher, prompts, lengths, cfg, seed, batch_size, pad, width)
    data = token_data(ids, targets)
    if path is not None:
        _save_set(path, data, cfg, seed)
    return data


def _continue_all(teacher: nn.Module, prompts: torch.Tensor, lengths: torch.Tensor, cfg: GenerationConfig,
                  seed: int, batch_size: int, pad: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's continuations of every prompt, batch by batch with one seeded generator, all padded to the
    same width; returns ``(ids, targets)``."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    total = width + cfg.max_new_tokens if cfg.max_length is None else min(width + cfg.max_new_tokens, cfg.max_length)
    for start in range(0, len(prompts), batch_size):
        part = generate(teacher, prompts[start:start + batch_size], lengths[start:start + batch_size], cfg,
                        generator=generator)
        grow = total - part.x.shape[1]  # every batch padded to the same width
        xs.append(torch.nn.functional.pad(part.x, (0, grow), value=pad))
        ys.append(torch.nn.functional.pad(part.y, (0, grow), value=IGNORE))
    return torch.cat(xs), torch.cat(ys)


def _save_set(path: Path, data, cfg: GenerationConfig, seed: int) -> None:
    """Write the generated set atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"x": data.x.contiguous(), "y": data.y.contiguous()}, str(tmp),
              metadata={"config": json.dumps(asdict(cfg)), "seed": str(seed)})
    tmp.replace(path)
