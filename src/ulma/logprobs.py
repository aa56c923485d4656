"""The ONE place where logits become per-token and per-sequence log-probabilities.

log p(y_t | x, y_<t) = logit[y_t] - logsumexp(logits), with the log-sum-exp in float32.
:func:`forward_logps` is the entry point: a model and a collated batch in, per-sequence
sums and token counts out.  By default it takes the log-probs from the final hidden
states with the output layer applied only at scored positions (:class:`LinearTokenLogps`),
and runs a prompt shared by several rows once (:func:`pack_prompts`); otherwise from the
model's own logits (:func:`token_logps`).  No [N, T, V] float32 tensor is materialised.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from ulma.data.tokenize import packed_shape


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_rows: int = 4):
    """Per-token log-probs of the tokens in ``input_ids`` under ``logits``.

    logits: [N, K, V] (any float dtype) for the LAST K positions of input_ids [N, T]
    (K = T for a full forward); loss_mask: [N, T] bool, True on the tokens to score.
    Position t's logits predict token t+1, so the result is aligned with tokens
    T-K+1..T-1: returns (logps [N, K-1] float32, mask [N, K-1] bool), zero where the
    mask is False.
    """
    start = input_ids.shape[1] - logits.shape[1] + 1
    targets = input_ids[:, start:]
    mask = loss_mask[:, start:]
    out = [_picked_logps(logits[s : s + chunk_rows, :-1], targets[s : s + chunk_rows])
           for s in range(0, logits.shape[0], chunk_rows)]
    logps = torch.cat(out) * mask
    return logps, mask


def _picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [..., V], targets [...] -> float32 log-softmax at the targets (log-sum-exp in float32)."""
    picked = torch.gather(logits, -1, targets[..., None]).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def reduce_logps(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """log pi(y|x) as a sum over response tokens, or their mean (the authors' point-wise code)."""
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"unknown log-prob reduction {reduction!r} (expected 'sum' or 'mean')")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays on a GPU that supports it and on CPUs with AMX or AVX512-BF16; elsewhere
    (e.g. AVX2-only CPUs) bf16 matrix products are emulated and many times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def use_bf16(setting, device: torch.device) -> bool:
    """Resolve ``train.bf16`` ("auto", True or False) for ``device``."""
    return bf16_is_fast(device) if setting == "auto" else bool(setting)


def attention_kernels():
    """Scaled-dot-product attention without the cuDNN backend: the context of every forward
    pass, and of every backward (gradient checkpointing reruns forward passes there).

    Why: on Hopper GPUs PyTorch picks cuDNN's attention, which builds a graph for every new
    input shape, and padded batches (and generation) bring a new shape almost every step
    (benchmarks/README.md).  The flags steer only CUDA's choice, so the context is the same
    on every device; a checkpointed recompute outside it would pick another kernel than its
    forward, which gradient checkpointing rejects.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextmanager
def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """The context of every forward pass: bf16 autocast on CPU or GPU where ``enabled``
    (weights stay float32), and :func:`attention_kernels`.  ``cache``: autocast keeps its
    bf16 casts of weights until the context exits (see :func:`forward_cache`)."""
    with ExitStack() as stack:
        if enabled:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache))
        stack.enter_context(attention_kernels())
        yield


def forward_cache(model) -> bool:
    """Whether a forward of ``model`` should keep autocast's casts of weights (its cache):
    not when it records a graph with gradient checkpointing.  A training forward uses each
    weight once, so the cache saves no cast; with checkpointing it would only hold a bf16
    copy of the model to the end of the forward, which the backward casts again anyway."""
    # Hugging Face marks each checkpointed module with ``gradient_checkpointing = True``
    # (``is_gradient_checkpointing`` is a deprecated alias that warns).
    return not (torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True
                                                for m in model.modules()))


@contextmanager
def cast_once(model, bf16: bool, fused: bool = True):
    """The context of a pass of many forward batches without gradients (reference log-probs,
    evaluation, perplexity): under bf16 autocast each float32 weight is cast to bf16 once
    for the pass instead of once a batch.  Yields the output layer's weight in bf16, for
    :func:`forward_logps`'s ``head_weight`` (None: not ``fused``, no fusable head, or
    nothing to do).

    How: autocast keeps its casts of weights that require gradients until its outermost
    context exits, so one context around the pass makes them last across its batches;
    frozen float32 weights are marked as requiring gradients for the pass so that they are
    cached too (under no_grad nothing records a graph for them).  The casts are autocast's
    own, so results do not change; frozen float32 weights' casts last the pass instead of
    one product.  Nothing is done where weights are sharded (FSDP, ZeRO-3): a cache would
    keep every layer's gathered weights for the whole pass.
    """
    params = list(model.parameters())
    if not (bf16 and params and all(_whole(p) for p in params)):
        yield None
        return
    if torch.is_grad_enabled():
        raise RuntimeError("cast_once is for passes without gradients (run it under torch.no_grad())")
    frozen = [p for p in params if not p.requires_grad and p.dtype == torch.float32]
    head = fusable_head(model) if fused else None
    try:
        for p in frozen:
            p.requires_grad_(True)
        with autocast(params[0].device, True):
            yield None if head is None else head.weight.to(torch.bfloat16)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def logits_to_keep(loss_mask: torch.Tensor) -> int:
    """How many final positions need logits: from the one before the first response token.

    Prompt positions need no logits (the output layer is a large share of a small model's
    compute); with right padding the response tokens of every row lie in the last
    ``T - first_response + 1`` positions.
    """
    any_row = loss_mask.any(0)
    if not bool(any_row.any()):
        return loss_mask.shape[1]
    first = int(any_row.float().argmax())
    return loss_mask.shape[1] - max(first - 1, 0)


class LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for M scored positions, ``chunk`` at a time
    (``back_chunk`` at a time in the backward; 0: ``chunk``), over ``block`` rows of the
    vocabulary at a time (0: all; :func:`head_plan` picks the sizes).

    hidden [M, H], weight [V, H] (the output layer), targets [M] -> float32 [M].  The
    [M, V] logits exist one [chunk, block] piece at a time, in the forward and again in the
    backward, which recomputes them: no [N, T, V] logits and no logits gradient.  Gradient:
    d logp / d logits = onehot(target) - softmax(logits), the softmax taken from the
    forward's saved log-sum-exp [M] (the blocks' log-sum-exps combined).  The matrix
    products run in the autocast dtype when autocast is on (as the model's own output layer
    would), the log-sum-exp in float32.  Where the weight is stored in another dtype (a
    float32 output layer tied to the embedding), a block is cast at a time, so no whole cast
    copy of the layer is ever held; in one block the cast copy is kept for the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, back_chunk: int = 0, block: int = 0):
        dt = _product_dtype(hidden)
        block = block or weight.shape[0]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], -(-weight.shape[0] // block), dtype=torch.float32, device=hidden.device)
        for b, v in enumerate(range(0, weight.shape[0], block)):
            w = weight[v : v + block].to(dt)
            at, inside = _in_block(targets, v, w.shape[0])
            for s in range(0, hidden.shape[0], chunk):
                z = _float_buffer(hidden[s : s + chunk].to(dt) @ w.T)  # [c, block]
                picked = z.gather(1, at[s : s + chunk, None]).squeeze(1)
                out[s : s + chunk] = torch.where(inside[s : s + chunk], picked, out[s : s + chunk]) if b else picked
                top = z.amax(1, keepdim=True)
                lse[s : s + chunk, b] = z.sub_(top).exp_().sum(1).log_() + top.squeeze(1)
        lse = torch.logsumexp(lse, 1)
        # One block: the cast weight, not the stored one: the backward needs it in ``dt``
        # again (as autocast's own Linears keep theirs).  Several: the stored weight, cast
        # again block by block.
        ctx.save_for_backward(hidden, w if block >= weight.shape[0] else weight, targets, lse)
        ctx.chunk, ctx.block, ctx.dt, ctx.weight_dtype = back_chunk or chunk, block, dt, weight.dtype
        return out.sub_(lse)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_h = _sum_buffer(hidden, hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = _sum_buffer(weight, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        for v in range(0, weight.shape[0], ctx.block):
            w = weight[v : v + ctx.block].to(ctx.dt)
            at, inside = _in_block(targets, v, w.shape[0])
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk].to(ctx.dt)
                p = _float_buffer(h @ w.T).sub_(lse[s : s + ctx.chunk, None]).exp_()  # softmax [c, block]
                p.scatter_add_(1, at[s : s + ctx.chunk, None], -inside[s : s + ctx.chunk, None].to(p.dtype))
                d_logits = p.mul_(-grad[s : s + ctx.chunk, None]).to(ctx.dt)  # g * (onehot - softmax)
                if grad_h is not None:
                    grad_h[s : s + ctx.chunk] += d_logits @ w
                if grad_w is not None:
                    grad_w[v : v + ctx.block] += d_logits.T @ h
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        return grad_h, None if grad_w is None else grad_w.to(ctx.weight_dtype), None, None, None, None


def _sum_buffer(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros shaped as ``like``, in at least float32: the sum of the chunks' and blocks' bf16
    products is taken there, each product added as it is."""
    return torch.zeros(like.shape, dtype=torch.promote_types(dtype, torch.float32), device=like.device)


def _in_block(targets: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as columns of the vocabulary block [start, start + width) (clamped into it)
    and whether each lies in it."""
    at = targets - start
    return at.clamp(0, width - 1), (at >= 0) & (at < width)


def _product_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's matrix product runs in: autocast's where it is on."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _float_buffer(logits: torch.Tensor) -> torch.Tensor:
    """The product in at least float32, as a tensor this code owns (a fresh float32 or
    float64 product already is one; a bf16 one is copied), so that it may be changed in place."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


FUSED_CHUNK = 512  # scored positions per chunk: [512, V] float32 logits
CPU_CHUNK_BYTES = 24 << 20  # a CPU forward chunk's float32 logits, under glibc's 32 MB mmap threshold


def chunk_rows(device: torch.device, vocab: int) -> tuple[int, int]:
    """(forward, backward) chunk rows of :class:`LinearTokenLogps` for a ``vocab``-wide output.

    On a CPU the forward's chunks hold at most ``CPU_CHUNK_BYTES`` of float32 logits: glibc
    serves larger blocks with a fresh mapping every time, whose pages fault in as the
    product writes them, while smaller freed blocks are reused.  The backward keeps
    ``FUSED_CHUNK``: each of its chunks also adds a whole [V, H] weight gradient, so fewer,
    larger chunks pay.  CUDA's caching allocator reuses blocks of any size: ``FUSED_CHUNK``
    for both (measurements: benchmarks/README.md).
    """
    if device.type != "cpu":
        return FUSED_CHUNK, FUSED_CHUNK
    return max(16, min(FUSED_CHUNK, CPU_CHUNK_BYTES // (4 * vocab))), FUSED_CHUNK


HEAD_BLOCK_BYTES = 24 << 20  # at most this much of the output layer cast at a time


def head_plan(weight: torch.Tensor, device: torch.device, bf16: bool) -> tuple[int, int, int]:
    """(forward chunk rows, backward chunk rows, vocabulary rows a block) of
    :class:`LinearTokenLogps` for the output layer ``weight`` [V, H] under ``bf16`` autocast.

    A weight stored in the product's dtype is one block: nothing is cast.  Otherwise (a
    float32 layer tied to the embedding, a trained one) it is cast in even blocks of at most
    ``HEAD_BLOCK_BYTES``: a whole cast copy would be one more output layer in memory at the
    step's peak, for a cast of each block in the backward as well.  Chunk rows fit the block
    (:func:`chunk_rows`).
    """
    vocab, hidden = weight.shape
    dt = torch.bfloat16 if bf16 else weight.dtype
    blocks = 1 if weight.dtype == dt else -(-vocab * hidden * dt.itemsize // HEAD_BLOCK_BYTES)
    block = -(-vocab // blocks)
    return (*chunk_rows(device, block), block)


def fusable_head(model):
    """The output layer when log-probs can be taken from the final hidden states with
    :class:`LinearTokenLogps`: a bias-free Linear whose weight is a whole tensor here (not
    sharded by FSDP or ZeRO-3) and no logit scaling or soft-capping in the model.  None
    otherwise (the model's own logits are used)."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    w = head.weight
    if not _whole(w) or w.numel() == 0:
        return None
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head


def _whole(t: torch.Tensor) -> bool:
    """A tensor held whole here: not a shard (FSDP's DTensor, DeepSpeed ZeRO-3's partition)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not hasattr(t, "ds_id")


def forward_logps(model, batch: dict, *, bf16: bool, need_tokens: bool = False, fused: bool = True,
                  share_prompts: bool = True, head_weight: torch.Tensor | None = None, multiple: int = 1):
    """Run ``model`` on a collated batch; returns dict(sum [N], count [N], and tokens/mask).

    ``fused`` (where :func:`fusable_head` allows): the output layer is applied only at the
    scored positions, chunk by chunk (:class:`LinearTokenLogps`), from the final hidden
    states; otherwise from the model's logits of the last positions (:func:`token_logps`).
    ``share_prompts`` (with ``fused``): rows with the same prompt -- a pair's chosen and
    rejected -- run that prompt once (:func:`pack_prompts`).
    ``head_weight``: the output layer's weight already in the compute dtype, for a pass
    without gradients (:func:`cast_once`); the fused path then casts none.
    ``multiple``: packed widths and the number of scored positions are rounded up to a
    multiple of it, as the batch's width is (``train.pad_to_multiple_of``): a few shapes.
    """
    head = fusable_head(model) if fused else None
    if head is None:
        return _logits_logps(model, batch, bf16, need_tokens)
    pack = pack_prompts(batch, hidden_size(model), multiple) if packs_prompts(model, fused, share_prompts) else None
    weight = head.weight if head_weight is None else head_weight
    return _fused_logps(model, head, weight, batch, bf16, need_tokens, pack, multiple)


def _logits_logps(model, batch: dict, bf16: bool, need_tokens: bool) -> dict:
    """Log-probs from the model's own logits of the last positions (:func:`logits_to_keep`)."""
    device = next(model.parameters()).device
    with autocast(device, bf16, forward_cache(model)):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=padding_mask(batch, device),
                       use_cache=False, logits_to_keep=logits_to_keep(batch["loss_mask"])).logits
    logps, mask = token_logps(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device))
    return _result(logps, mask, need_tokens)


def padding_mask(batch: dict, device: torch.device) -> torch.Tensor | None:
    """The attention mask a causal model needs for ``batch``: None when every row is padded
    on the right only (as :func:`ulma.data.tokenize.pad_rows` pads), since a real token never
    attends to the padding after it.  Without a mask the model runs its plain causal kernel:
    with one, Hugging Face's SDPA attention repeats grouped key/value heads and keeps those
    copies for the backward, and the kernel is slower.  Scores at real tokens are the same;
    those at padding are never read.  Checked on the CPU tensor: no wait for the GPU."""
    attn = batch["attention_mask"]
    if bool((attn[:, 1:] <= attn[:, :-1]).all()):
        return None
    return attn.to(device)


def _result(logps: torch.Tensor, mask: torch.Tensor, need_tokens: bool) -> dict:
    out = {"sum": logps.sum(-1), "count": mask.sum(-1)}
    if need_tokens:
        out["tokens"], out["mask"] = logps, mask
    return out


def _fused_logps(model, head, weight, batch: dict, bf16: bool, need_tokens: bool, pack: dict | None = None,
                 multiple: int = 1) -> dict:
    """Log-probs from the final hidden states at the scored positions (``head``: the output
    layer, :func:`fusable_head`; ``weight``: its [V, H] weight, maybe already cast), of the
    batch's rows or of their packed form (:func:`pack_prompts`: each distinct prompt runs
    once, and gradients reach it from every response that shares it)."""
    device = weight.device
    # The scored positions are found where the batch was built (on the CPU): indexing with
    # them needs no wait for the GPU, where a boolean mask would (its count decides the
    # output's size).
    scored = batch["loss_mask"][:, 1:]
    rows, cols = (i.to(device, non_blocking=True) for i in scored.nonzero(as_tuple=True))
    if pack is None:  # whole rows: position c scores token c + 1
        ids = batch["input_ids"].to(device)
        inputs = {"input_ids": ids, "attention_mask": padding_mask(batch, device)}
        at, targets = (rows, cols), ids[rows, cols + 1]
    else:  # the same scored tokens, in the same order
        p = {k: v.to(device, non_blocking=True) for k, v in pack.items()}
        inputs = {k: p[k] for k in ("input_ids", "attention_mask", "position_ids")}
        at, targets = (p["src_row"], p["src_pos"]), p["targets"]
    n = targets.shape[0]
    at, targets = _repeat_first(at, targets, -n % multiple)  # scored positions of a few counts
    with autocast(device, bf16, forward_cache(model)):
        hidden = final_hidden_states(model, inputs, head)  # [rows, width, H], after the final norm
        values = LinearTokenLogps.apply(hidden[at], weight, targets, *head_plan(weight, device, bf16))[:n]
    mask = scored.to(device)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=device).index_put_((rows, cols), values)
    return _result(logps, mask, need_tokens)


def _repeat_first(at: tuple, targets: torch.Tensor, extra: int) -> tuple:
    """``extra`` more copies of the first scored position and its target (scored, then
    dropped: they get no gradient)."""
    if extra == 0 or targets.shape[0] == 0:
        return at, targets
    more = lambda t: torch.cat([t, t[:1].expand(extra)])  # noqa: E731
    return tuple(more(a) for a in at), more(targets)


def final_hidden_states(model, inputs: dict, head=None) -> torch.Tensor:
    """The decoder's last hidden states [rows, width, H] (after the final norm) for ``inputs``,
    from a call of the whole ``model`` (through any DDP / DeepSpeed wrapper, whose forward
    must run) that computes its own logits at one position only, or none where ``head``, its
    output layer, is given (:func:`_no_logits`).

    They are taken by a forward hook on the decoder module (``get_decoder()``), not with
    ``output_hidden_states=True``: that installs Hugging Face's output-capturing hooks on
    every layer, which read a ContextVar that ``torch.compile`` cannot trace, so a compiled
    layer (``train.compile``) would break into pieces at each of them."""
    decoder = _decoder(model)
    with _no_logits(head):
        if decoder is None:
            return model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        seen = []
        handle = decoder.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
    out = seen[-1]
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@contextmanager
def _no_logits(head):
    """The output layer ``head`` (None: nothing is done) returns empty logits [..., 0] for
    the call: its one-position logits are not wanted (the fused layer takes log-probs from
    the hidden states), and under autocast computing them would cast its whole weight to
    bf16 every step.  The module is still called, so hooks on it (DeepSpeed's, FSDP's) run."""
    if head is None or "forward" in vars(head):
        yield
        return
    head.forward = _empty_logits
    try:
        yield
    finally:
        del head.forward


def _empty_logits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros(hidden.shape[:-1] + (0,))


def _decoder(model):
    """The module under ``model``'s output layer that returns the last hidden states (a
    Hugging Face causal LM's ``get_decoder()``: LlamaModel under LlamaForCausalLM, also
    through PEFT), or None where there is no such module apart from the model itself."""
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_decoder", None)
    decoder = get() if get else None
    top = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # under PEFT's wrapper
    if not isinstance(decoder, torch.nn.Module) or decoder is top or decoder is inner:
        return None
    return decoder


def _config(model):
    return getattr(getattr(model, "module", model), "config", None)  # through DDP / DeepSpeed wrappers


def hidden_size(model) -> int:
    """The model's width (0: unknown), which weighs matrix products against attention."""
    return int(getattr(_config(model), "hidden_size", 0) or 0)


def packs_prompts(model, fused: bool = True, share_prompts: bool = True) -> bool:
    """Whether :func:`forward_logps` with these settings runs rows that share a prompt as one
    packed row (:func:`pack_prompts`) for ``model``."""
    return fused and share_prompts and fusable_head(model) is not None and _can_share(model)


def _can_share(model) -> bool:
    """Packed prompts need a custom [B, 1, W, W] attention mask, which Hugging Face models
    take as it is with PyTorch's scaled-dot-product attention (not eager or flash-attn), and
    then apply no sliding window of their own."""
    config = _config(model)
    return getattr(config, "_attn_implementation", None) == "sdpa" and not _sliding(config)


def pack_prompts(batch: dict, hidden: int = 0, multiple: int = 1) -> dict | None:
    """One packed row per distinct prompt of a right-padded batch: [prompt, response_1, ...,
    response_k], each response attending to the prompt and to itself (causally), at the
    positions that continue the prompt.  None when no prompt repeats or packing would not
    shrink the batch's cost (:func:`ulma.data.tokenize.packed_shape`, ``hidden`` the model's
    width).  The packed width is rounded up to a multiple of ``multiple`` (as
    :func:`forward_logps`).

    A row's prompt is its tokens before the first scored one (``loss_mask``).  Returns CPU
    tensors: input_ids / position_ids [P, W], attention_mask [P, 1, W, W] bool (padding
    attends to itself only: no empty row), and for the M scored tokens of the batch, in the
    row-major order of ``loss_mask[:, 1:]``: src_row / src_pos [M], the packed position
    whose hidden state scores the token, and targets [M].
    """
    ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"].bool()
    n_rows, width = ids.shape
    if not bool(scored.any(1).all()):
        return None
    start = scored.int().argmax(1)  # first scored token of each row
    if int(start.min()) < 1:
        return None  # no prompt token to score the first response token from
    length = attn.sum(1)
    groups = _prompt_groups(ids, start.tolist())
    widths = [len(k) + sum(int(length[i] - start[i]) for i in g) for k, g in groups.items()]
    shape = packed_shape(n_rows, width, widths, hidden, multiple)
    if shape is None:
        return None
    w = shape[1]
    packed = torch.zeros((len(groups), w), dtype=ids.dtype)
    positions = torch.zeros((len(groups), w), dtype=torch.long)
    mask = torch.zeros((len(groups), w, w), dtype=torch.bool)
    home, offset = torch.zeros(n_rows, dtype=torch.long), torch.zeros(n_rows, dtype=torch.long)
    for p, (prompt, rows) in enumerate(groups.items()):
        n = len(prompt)
        packed[p, :n], positions[p, :n] = torch.tensor(prompt), torch.arange(n)
        mask[p, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        o = n
        for i in rows:
            a, m = int(start[i]), int(length[i] - start[i])
            packed[p, o : o + m], positions[p, o : o + m] = ids[i, a : a + m], torch.arange(n, n + m)
            mask[p, o : o + m, :n] = True
            mask[p, o : o + m, o : o + m] = torch.ones(m, m, dtype=torch.bool).tril()
            home[i], offset[i] = p, o
            o += m
        pad = torch.arange(o, w)
        mask[p, pad, pad] = True
    rows, token, src_pos = _scored_sources(scored[:, 1:], start, offset)
    return {"input_ids": packed, "position_ids": positions, "attention_mask": mask[:, None],
            "src_row": home[rows], "src_pos": src_pos, "targets": ids[rows, token]}


def _sliding(config) -> bool:
    """A model with sliding-window layers (Mistral; Qwen2 with ``use_sliding_window``): its
    windows are a mask the packed forms do not build."""
    if getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False:
        return False
    return "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])


def _prompt_groups(ids: torch.Tensor, first: list[int]) -> dict:
    """Row indices by prompt, a row's tokens before ``first[i]``, its first scored token (in
    the order the prompts first appear); rows with ``first[i] < 1`` are left out."""
    groups: dict = {}
    for i, f in enumerate(first):
        if f > 0:
            groups.setdefault(tuple(ids[i, :f].tolist()), []).append(i)
    return groups


def _scored_sources(scored: torch.Tensor, first: torch.Tensor, response_at: torch.Tensor):
    """For the scored tokens of a packed batch (``scored`` [N, T-1]: ``loss_mask[:, 1:]``,
    position c scores token c + 1), in row-major order: (row [M], token [M], source [M]), the
    packed position whose hidden state scores each token.  A row's first response token
    (``first`` [N]) is scored from its prompt's last position (prompts start at 0), the
    others from the response itself (which starts at ``response_at`` [N])."""
    rows, cols = scored.nonzero(as_tuple=True)
    token, f = cols + 1, first[rows]
    return rows, token, torch.where(token == f, f - 1, response_at[rows] + token - 1 - f)
