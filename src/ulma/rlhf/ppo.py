"""``method: rlhf`` -- PPO on the KL-regularised objective of Eq. 3.

One step:

1. sample ``ppo.rollout_batch`` prompts (cut from the left to ``data.max_length -
   ppo.max_new_tokens`` tokens, counted) and generate a response to each from the policy;
2. score the response *text* with the reward (a :class:`~ulma.scoring.RewardScorer`
   on ``ppo.reward_model``, which re-tokenises it, or any Python callable);
3. with the rollout's policy log-probs, reference log-probs (LoRA: the base with the
   adapters disabled) and values, build per-token rewards ``-beta * KL_t`` plus the score
   on the last token, then GAE advantages (whitened) and returns;
4. ``ppo.ppo_epochs`` passes over the rollouts in mini-batches of ``ppo.mini_batch_size``:
   clipped policy loss + ``vf_coef`` * clipped value loss, one optimizer update each.

Layout of a rollout: ``input_ids [N, P + R]`` = left-padded prompt (P) + right-padded
response (R); per-token tensors are ``[N, R]`` over the response positions.  Dropout is
off throughout (the model stays in eval mode), so the first epoch's ratio is 1 (to rounding).

Data-parallel (``--num-processes``, ``accelerate launch``: DDP).  Each process samples and
scores its share of the step's prompts (generation, reward, reference: the expensive part,
on the model without DDP's wrapper), then every process holds the whole batch
(:func:`gather_rollouts`), so advantages, whitening and the logged statistics are those of
the whole batch.  The update runs each process's share of every mini-batch through one DDP
wrapper over the policy and its value head: the update one process would make with the same
rollouts.  Sampling noise is not that of one process (each process draws its own), so a
2-process run is not the 1-process run; its updates are.

A reward callable has the signature ``reward(prompts, texts, token_ids) -> Tensor [N]``:
``prompts`` are chat-turn tuples, ``texts`` the decoded responses (special tokens removed)
and ``token_ids`` the response token ids before the first EOS.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ulma import checkpoint as ckpt
from ulma.activations import keep_less
from ulma.atomic import atomic_write_json
from ulma.config import Config, ConfigError, to_dict, validate
from ulma.data.prepare import load_split
from ulma.data.tokenize import Tokenizer, fit, left_pad, stop_tokens
from ulma.evaluation.generate import generate_tokens
from ulma.logprobs import autocast, token_logps, use_bf16
from ulma.loop import (DataParallelLoop, data_parallel_accelerator, make_optimizer, my_share, non_finite, set_seed,
                       step_plan, total_steps)
from ulma.models import Reference, is_peft, load_policy, load_tokenizer, trainable_parameters
from ulma.rlhf import losses as RL
from ulma.rlhf.value_head import PolicyWithValueHead, ValueHead, load_value_head

RewardFn = Callable[[list, list, list], torch.Tensor]
STATS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")  # the update's token-mean statistics


# ------------------------------------------------------------------ prompts and generation


def encode_prompts(tokenizer, prompts: list, limit: int) -> tuple[list[list[int]], list[bool]]:
    """Chat-template token ids of each prompt, cut from the LEFT to ``limit`` tokens (the
    latest turns and the generation prompt are kept); returns (ids, was_cut flags)."""
    enc = Tokenizer(tokenizer, limit)
    out, cut = [], []
    for p in prompts:
        ids, _, was_cut, _ = fit(enc.encode_prompt(p), [], limit)
        out.append(ids)
        cut.append(bool(was_cut))
    return out, cut


def response_mask(response: torch.Tensor, stop_ids) -> torch.Tensor:
    """True on the response tokens up to and including the first stop token: ``[N, R]`` bool.

    ``[a, b, EOS, EOS]`` -> ``[T, T, T, F]`` (what follows EOS is padding, even when the
    pad id is the EOS id, as for SmolLM2).  ``stop_ids``: one id, or several: the template's
    end-of-turn token and EOS (:func:`ulma.data.tokenize.stop_tokens`).
    """
    stops = sorted(stop_ids) if isinstance(stop_ids, (set, list, tuple)) else [stop_ids]
    is_eos = torch.isin(response, torch.tensor(stops, dtype=response.dtype)).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (what ``generate`` uses), ``[N, T]``."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def policy_forward(model, input_ids, attention_mask, mask, temperature: float, bf16: bool, values: bool = True):
    """Log-probs (and values) of the response tokens of a rollout layout.

    ``model``: a :class:`~ulma.rlhf.value_head.PolicyWithValueHead` (or its DDP wrapper);
    with ``values=False`` a causal LM (the reference).  ``input_ids``, ``attention_mask``:
    ``[N, P + R]``; ``mask``: ``[N, R]`` response tokens.  Returns ``(logps [N, R], values
    [N, R] or None, logits [N, R, V])``.  Logits are divided by the sampling temperature: the
    log-probs are those of the distribution the tokens were sampled from.
    """
    device = next(model.parameters()).device
    n_resp = mask.shape[1]
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with autocast(device, bf16):
        if values:
            logits, v = model(input_ids, attention_mask, positions(attention_mask), n_resp)
        else:
            logits, v = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                              logits_to_keep=n_resp + 1, use_cache=False).logits, None
    logits = logits if temperature == 1.0 else logits / temperature
    prompt_part = torch.zeros(mask.shape[0], input_ids.shape[1] - n_resp, dtype=torch.bool)
    loss_mask = torch.cat([prompt_part, mask.cpu()], dim=1).to(device)
    logps, _ = token_logps(logits, input_ids, loss_mask)
    return logps, None if v is None else v * mask.to(device), logits[:, :-1]


# ------------------------------------------------------------------ rollouts


@dataclass
class Rollout:
    """N sampled responses and what PPO needs of them (per-token tensors ``[N, R]``, CPU)."""

    prompts: list
    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    mask: torch.Tensor  # [N, R] bool
    texts: list
    token_ids: list
    logps: Optional[torch.Tensor] = None  # [N, R] under the policy that sampled them
    ref_logps: Optional[torch.Tensor] = None  # [N, R] under the reference
    values: Optional[torch.Tensor] = None  # [N, R]
    entropy: Optional[torch.Tensor] = None  # [N, R]
    scores: Optional[torch.Tensor] = None  # [N] reward of each response
    advantages: Optional[torch.Tensor] = None  # [N, R]
    returns: Optional[torch.Tensor] = None  # [N, R] value targets
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, idx) -> tuple:
        return self.input_ids[idx], self.attention_mask[idx], self.mask[idx]


def sample(policy, tokenizer, prompts: list, prompt_ids: list, ppo_cfg, bf16: bool) -> Rollout:
    """Generate a response to each prompt (:func:`laid_out`)."""
    ids, attn = left_pad(prompt_ids, tokenizer.pad_token_id)
    response = generate_tokens(policy, ids, attn, max_new_tokens=ppo_cfg.max_new_tokens, stops=stop_tokens(tokenizer),
                               pad_id=tokenizer.pad_token_id, sample=True, temperature=ppo_cfg.temperature,
                               top_p=ppo_cfg.top_p, bf16=bf16)
    return laid_out(tokenizer, prompts, prompt_ids, response)


def laid_out(tokenizer, prompts: list, prompt_ids: list, response: torch.Tensor) -> Rollout:
    """A Rollout of the responses ``[N, R]`` (padding after a stop token) to ``prompt_ids``:
    the layout, the response mask, and the text decoded for the reward."""
    ids, attn = left_pad(prompt_ids, tokenizer.pad_token_id)
    stops = stop_tokens(tokenizer)
    mask = response_mask(response, stops)
    content = [row[m & ~torch.isin(row, torch.tensor(sorted(stops)))].tolist() for row, m in zip(response, mask)]
    texts = tokenizer.batch_decode(content, skip_special_tokens=True)
    full_ids = torch.cat([ids, response], dim=1)
    full_attn = torch.cat([attn, mask.long()], dim=1)
    return Rollout(prompts, full_ids, full_attn, mask, texts, content)


TOKEN_FIELDS = ("logps", "ref_logps", "values", "entropy")  # the per-token tensors of a scored rollout


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Scored rollouts (the processes' shares, in order) as one, laid out as if sampled
    together: prompts left-padded to the widest prompt, responses right-padded to the longest
    (the mask and per-token tensors with False / 0).  Advantages come after, on the whole."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.input_ids.shape[1] - p.mask.shape[1] for p in parts)
    n_resp = max(p.mask.shape[1] for p in parts)
    parts = [_widen(p, width, n_resp, pad_id) for p in parts]

    def joined(k):
        return [x for p in parts for x in getattr(p, k)]

    def stacked(k):
        return torch.cat([getattr(p, k) for p in parts])

    out = Rollout(joined("prompts"), stacked("input_ids"), stacked("attention_mask"), stacked("mask"), joined("texts"),
                  joined("token_ids"))
    for k in (*TOKEN_FIELDS, "scores"):
        if getattr(parts[0], k) is not None:
            setattr(out, k, stacked(k))
    return out


def _widen(ro: Rollout, width: int, n_resp: int, pad_id: int) -> Rollout:
    """``ro`` with its prompts left-padded to ``width`` tokens and responses right-padded to ``n_resp``."""
    left, right = width - (ro.input_ids.shape[1] - ro.mask.shape[1]), n_resp - ro.mask.shape[1]
    tokens = {k: F.pad(getattr(ro, k), (0, right)) for k in TOKEN_FIELDS if getattr(ro, k) is not None}
    return replace(ro, input_ids=F.pad(ro.input_ids, (left, right), value=pad_id),
                   attention_mask=F.pad(ro.attention_mask, (left, right)), mask=F.pad(ro.mask, (0, right)), **tokens)


def gather_rollouts(part: Optional[Rollout], pad_id: int, world: int) -> Rollout:
    """Every process's share of a batch of rollouts (None: an empty share), in process order,
    merged on every process (:func:`merge_rollouts`); one process: ``part`` itself."""
    if world == 1:
        return part
    from accelerate.utils import gather_object

    return merge_rollouts([p for p in gather_object([part]) if p is not None], pad_id)


@torch.no_grad()
def score_rollout(ro: Rollout, model, reference: Reference, reward: RewardFn, ppo_cfg, micro: int,
                  bf16: bool) -> None:
    """Fill in the old log-probs, values, entropy, reference log-probs and reward scores
    (``model``: the :class:`~ulma.rlhf.value_head.PolicyWithValueHead`, without DDP's wrapper)."""
    parts = {"logps": [], "values": [], "entropy": [], "ref": []}
    for s in range(0, len(ro), micro):
        ids, attn, mask = ro.rows(slice(s, s + micro))
        logps, values, logits = policy_forward(model, ids, attn, mask, ppo_cfg.temperature, bf16)
        parts["logps"].append(logps.cpu())
        parts["values"].append(values.cpu())
        parts["entropy"].append(RL.entropy_from_logits(logits).cpu() * mask)
        del logits
        with reference.model() as ref_net:
            parts["ref"].append(policy_forward(ref_net, ids, attn, mask, ppo_cfg.temperature, bf16, False)[0].cpu())
    ro.logps, ro.values = torch.cat(parts["logps"]), torch.cat(parts["values"])
    ro.entropy, ro.ref_logps = torch.cat(parts["entropy"]), torch.cat(parts["ref"])
    ro.scores = check_scores(reward(ro.prompts, ro.texts, ro.token_ids), len(ro))


@contextmanager
def forked_rng(seed: int, device: torch.device):
    """Random draws inside come from a stream seeded with ``seed``; the run's own is restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def check_scores(scores, n: int) -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().flatten()
    if scores.shape != (n,):
        raise ValueError(f"the reward returned {tuple(scores.shape)} scores for {n} responses; expected one each")
    if not torch.isfinite(scores).all():
        raise ValueError(f"the reward returned non-finite scores: {scores.tolist()}")
    return scores


def advantages(ro: Rollout, ppo_cfg, beta: float) -> None:
    """Per-token rewards (Eq. 3), GAE advantages and returns; the step's reward/KL numbers."""
    kl = RL.kl_penalty(ro.logps, ro.ref_logps, ppo_cfg.kl_estimator) * ro.mask
    rewards = RL.shaped_rewards(ro.scores, kl, ro.mask, beta)
    adv, ro.returns = RL.gae(rewards, ro.values, ro.mask, ppo_cfg.gamma, ppo_cfg.lam)
    ro.advantages = RL.masked_whiten(adv, ro.mask) if ppo_cfg.whiten_advantages else adv
    seq_kl = ((ro.logps - ro.ref_logps) * ro.mask).sum(-1)  # k1 summed over the response: KL(pi || ref) per sequence
    ro.stats = {
        "reward": float(ro.scores.mean()),
        "kl": float(seq_kl.mean()),
        "non_score_reward": float((-beta * kl).sum(-1).mean()),
        "reward_total": float(ro.scores.mean() + (-beta * kl).sum(-1).mean()),
        "entropy": float(RL.masked_mean(ro.entropy, ro.mask)),
        "response_length": float(ro.mask.sum(-1).float().mean()),
    }


# ------------------------------------------------------------------ the trainer


class PPOTrainer(DataParallelLoop):
    """PPO with LoRA (or full fine-tuning), a value head and a KL penalty to the reference
    (the loop itself: :class:`ulma.loop.Loop`; one step = one rollout batch), in one process
    or data-parallel ones (the module's docstring).

    ``reward``: a callable ``(prompts, texts, token_ids) -> Tensor [N]``; None loads a
    :class:`~ulma.scoring.RewardScorer` from ``ppo.reward_model``.
    """

    desc = "ppo"

    def __init__(self, cfg: Config, reward: Optional[RewardFn] = None):
        validate(cfg)
        if reward is None and not cfg.ppo.reward_model:
            raise ConfigError("ppo.reward_model: method rlhf needs a reward model folder (train one with method.name=reward)")
        self.cfg, p = cfg, cfg.ppo
        self.beta = cfg.method.beta if p.beta is None else p.beta
        self.acc = data_parallel_accelerator("rlhf")
        self.device, self.world, self.rank = self.acc.device, self.acc.num_processes, self.acc.process_index
        self.out = Path(cfg.train.output_dir)
        ckpt.prepare_output(self.out, resume=cfg.train.resume, overwrite=cfg.train.overwrite,
                            delete=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.bf16 = use_bf16(cfg.train.bf16, self.device)
        self._prepare_prompts()
        # train.bf16_frozen_weights: every policy and reference forward (rollouts, scoring,
        # updates) runs under autocast, so frozen Linears are stored in bf16 (models.store_frozen_linears)
        frozen = torch.bfloat16 if self.bf16 and cfg.train.bf16_frozen_weights else None
        self.policy = load_policy(cfg.model, self.device, frozen).eval()  # eval: no dropout, ratio 1 on the first epoch
        keep_less(self.policy, cfg.train, cfg.model.lora, self.device.type)
        self.value_head = ValueHead(self.policy.config.hidden_size).to(self.device)
        self.reference = Reference(self.policy, keep_copy=not is_peft(self.policy), frozen_dtype=frozen)
        self.reward = reward if reward is not None else self._reward_model()
        self.total_steps = total_steps(cfg.train, len(self.prompts) / p.rollout_batch)
        updates = self.total_steps * p.ppo_epochs * math.ceil(p.rollout_batch / p.mini_batch_size)
        self.params = trainable_parameters(self.policy) + list(self.value_head.parameters())
        optimizer, self.scheduler = make_optimizer(self.params, cfg.train, updates)
        # one DDP wrapper over the policy and its value head: both trained, gradients averaged together
        self.model, self.optimizer = self.acc.prepare(PolicyWithValueHead(self.policy, self.value_head), optimizer)
        self.plan = step_plan(self.prompts, self.total_steps, p.rollout_batch, 1, cfg.train.seed, False)

    def _prepare_prompts(self) -> None:
        cfg = self.cfg
        train_ex, eval_ex, skipped = load_split(cfg)
        self.prompts = list(dict.fromkeys(e.prompt for e in train_ex))
        self.eval_prompts = list(dict.fromkeys(e.prompt for e in eval_ex))[: cfg.ppo.eval_prompts]
        if not self.prompts:
            raise ValueError(f"no training prompts in {cfg.data.train.source} {cfg.data.train.path or ''}".strip())
        limit = cfg.data.max_length - cfg.ppo.max_new_tokens
        self.prompt_ids, self.prompt_cut = encode_prompts(self.tokenizer, self.prompts, limit)
        self.eval_prompt_ids, eval_cut = encode_prompts(self.tokenizer, self.eval_prompts, limit)
        self.report = {"train_prompts": len(self.prompts), "eval_prompts": len(self.eval_prompts),
                       "prompt_limit": limit, "prompts_truncated": sum(self.prompt_cut),
                       "eval_prompts_truncated": sum(eval_cut),
                       "skipped_rows": len(skipped), "skipped_first": [str(e) for e in skipped[:5]]}

    def _reward_model(self) -> RewardFn:
        from ulma.scoring import RewardScorer

        p = self.cfg.ppo
        return RewardScorer(p.reward_model, self.device, p.reward_max_length, self.cfg.train.micro_batch_size, self.bf16,
                            bf16_weights=self.cfg.train.bf16_frozen_weights)

    # ------------------------------------------------------------------ one step
    def rollout(self, idx: list[int], prompts: list, prompt_ids: list) -> Rollout:
        """The rollouts of prompts ``idx``, scored, with their advantages: each process samples
        and scores its share, then every process holds them all, so advantages, whitening and
        statistics are those of the whole batch."""
        mine, share = my_share(idx, self.rank, self.world)
        part = self._sample_and_score([prompts[i] for i in mine], [prompt_ids[i] for i in mine]) if share else None
        ro = gather_rollouts(part, self.tokenizer.pad_token_id, self.world)
        advantages(ro, self.cfg.ppo, self.beta)
        return ro

    def _sample_and_score(self, prompts: list, prompt_ids: list) -> Rollout:
        ro = sample(self.policy, self.tokenizer, prompts, prompt_ids, self.cfg.ppo, self.bf16)
        score_rollout(ro, self.inner, self.reference, self.reward, self.cfg.ppo, self.cfg.train.micro_batch_size,
                      self.bf16)
        return ro

    def _noise(self, step: Optional[int]):
        """The random stream sampling draws from at training ``step`` (None: an evaluation).

        One process: the run's own stream; an evaluation forks one seeded with train.seed + 1
        (the same noise at every evaluation; training is untouched).  Several: a fork seeded
        by (train.seed, step, process): each process draws its own noise, the run's stream
        (the mini-batch orders of :meth:`update`) stays the same on all of them, and a resumed
        run samples what an uninterrupted one did.
        """
        seed = self.cfg.train.seed
        if self.world == 1:
            return nullcontext() if step is not None else forked_rng(seed + 1, self.device)
        # a tuple of ints hashes alike in every process and run (unlike strings)
        return forked_rng(hash((seed, -1 if step is None else step, self.rank)) % 2**63, self.device)

    def train_step(self, step: int) -> dict:
        idx = self.plan[step]
        with self._noise(step):
            ro = self.rollout(idx, self.prompts, self.prompt_ids)
        stats = self.update(ro)
        return {**ro.stats, **stats, "prompts_truncated": sum(self.prompt_cut[i] for i in idx),
                "skipped": stats["skipped_updates"] > 0}

    def update(self, ro: Rollout) -> dict:
        """``ppo_epochs`` passes over the rollouts, one optimizer update per mini-batch.

        Every process holds all the rollouts and draws the same mini-batches (the run's own
        random stream, :meth:`_noise`); each runs its share of them and DDP averages the
        gradients: the update one process makes with the whole mini-batch.
        """
        p = self.cfg.ppo
        sums = torch.zeros(len(STATS), dtype=torch.float64)
        tokens, norms, skipped = 0, [], 0
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(ro)).tolist()
            for s in range(0, len(ro), p.mini_batch_size):
                mb = order[s : s + p.mini_batch_size]
                n_tok = int(ro.mask[mb].sum())
                if n_tok == 0:
                    continue
                stats = self._minibatch(ro, mb, n_tok)
                sums += stats
                tokens += n_tok
                norm = self.acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm or math.inf)
                bad = non_finite(norm, stats[0], stats[1])  # the same on every process: sums over all of them
                if not bad:
                    self.optimizer.step()
                skipped += bad
                norms.append(float(norm))
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
        out = dict(zip(STATS, (sums / max(tokens, 1)).tolist()))  # token-weighted means over the step
        out.update(grad_norm=sum(norms) / max(len(norms), 1), lr=self.scheduler.get_last_lr()[0], skipped_updates=skipped)
        return out

    def _minibatch(self, ro: Rollout, mb: list[int], n_tok: int) -> torch.Tensor:
        """Backward of one mini-batch of ``n_tok`` tokens, in global micro-batches of
        ``micro_batch_size x processes`` rows (this process's share of each: every process
        runs as many forwards); returns the token SUMS of :data:`STATS` over all processes."""
        size = self.cfg.train.micro_batch_size * self.world
        chunks = [mb[s : s + size] for s in range(0, len(mb), size)]
        sums = torch.zeros(len(STATS), dtype=torch.float64)
        for k, chunk in enumerate(chunks):
            rows, share = my_share(chunk, self.rank, self.world)
            with self.acc.no_sync(self.model) if k < len(chunks) - 1 else nullcontext():
                sums += self._micro(ro, rows, n_tok, share)
        return self.acc.reduce(sums.to(self.device), "sum").cpu() if self.world > 1 else sums

    def _micro(self, ro: Rollout, rows: list[int], n_tok: int, share: float) -> torch.Tensor:
        """Backward of one micro-batch; token sums of :data:`STATS` (``share`` 0: a stand-in, counts nothing)."""
        p = self.cfg.ppo
        ids, attn, mask = ro.rows(rows)
        logps, values, logits = policy_forward(self.model, ids, attn, mask, p.temperature, self.bf16)
        del logits
        m = mask.to(logps.device).float()
        old_logps, adv, old_values, returns = (x[rows].to(logps.device) for x in
                                               (ro.logps, ro.advantages, ro.values, ro.returns))
        pg, pg_clipped = RL.clipped_policy_loss(logps, old_logps, adv, p.clip_range)
        vf, vf_clipped = RL.clipped_value_loss(values, old_values, returns, p.value_clip)
        # A sum over tokens divided by the mini-batch's token count: the micro-batches add up to
        # the token mean of the whole mini-batch (x processes: DDP averages the gradients).
        loss = ((pg + p.vf_coef * vf) * m).sum() / n_tok * self.world * share
        self.acc.backward(loss)
        sums = torch.stack([(pg.detach() * m).sum(), (vf.detach() * m).sum(), (pg_clipped.float() * m).sum(),
                            (vf_clipped.float() * m).sum(), (0.5 * (logps.detach() - old_logps) ** 2 * m).sum()])
        return sums.double().cpu() * share

    # ------------------------------------------------------------------ the loop (ulma.loop.Loop)
    def postfix(self, row: dict) -> dict:
        return {"reward": f"{row['reward']:.3f}", "kl": f"{row['kl']:.3f}"}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Mean reward and KL of responses sampled for the held-out prompts (split between the
        processes), with a fixed seed: the same sampling noise at every evaluation (:meth:`_noise`)."""
        if not self.eval_prompts:
            return {}
        with self._noise(None):
            ro = self.rollout(list(range(len(self.eval_prompts))), self.eval_prompts, self.eval_prompt_ids)
        metrics = {k: ro.stats[k] for k in ("reward", "kl", "reward_total", "entropy", "response_length")}
        metrics["prompts"] = len(ro)
        self._log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        metrics["samples"] = [{"prompt": ro.prompts[i][-1]["content"], "response": ro.texts[i],
                               "reward": float(ro.scores[i])} for i in range(min(3, len(ro)))]
        return metrics

    def load(self, found: Path) -> dict:
        ckpt.load_weights(self.policy, found / "model")
        load_value_head(self.value_head, found / "model")
        return ckpt.load_trainer_state(found, self.optimizer, self.scheduler)

    def finish(self, results: dict) -> dict:
        truncated = getattr(self.reward, "prompts_truncated", None)  # counted where each process scored
        if truncated is not None and self.world > 1:
            truncated = int(self.acc.reduce(torch.tensor(truncated, device=self.device), "sum"))
        results.update(method="rlhf", beta=self.beta, config=to_dict(self.cfg), steps=self.total_steps,
                       processes=self.world, data={**self.report, "reward_prompts_truncated": truncated})
        if self.is_main:
            ckpt.atomic_save_model(self.out / "final", self.inner, self.tokenizer)
            atomic_write_json(self.out / "results.json", results)
        self.acc.wait_for_everyone()
        return results


def train_ppo(cfg: Config, reward: Optional[RewardFn] = None) -> dict:
    """``ulma train`` with ``method.name: rlhf``."""
    return PPOTrainer(cfg, reward).run()
