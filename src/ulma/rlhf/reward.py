"""``method: reward`` -- a scalar reward model r_phi(x, y), and scoring text with it.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` built on
``model.name_or_path`` (LoRA or full); its score is read at the last non-padding token.
Losses by data (``reward.loss: auto``): pairs -> Bradley-Terry (Eq. 2), binary labels ->
cross-entropy (Eq. 7), scores -> MSE (Eq. 9).  ``OUTPUT/final/`` is a plain
sequence-classification folder (LoRA merged into the base, ``pad_token_id`` set, the
tokenizer and its chat template beside it)::

    AutoModelForSequenceClassification.from_pretrained("runs/reward/final")
    RewardScorer("runs/reward/final").score(prompts, responses)   # -> Tensor [N] (ulma.scoring)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from ulma import checkpoint as ckpt
from ulma.activations import keep_less
from ulma.atomic import atomic_write_json
from ulma.config import Config, ConfigError, to_dict, validate
from ulma.data.prepare import load_split, prepare
from ulma.data.schema import as_kind, pointwise_to_pairs
from ulma.data.tokenize import SequenceTable, Tokenizer, Units, collate
from ulma.evaluation.metrics import label_accuracy, reward_accuracy
from ulma.logprobs import use_bf16
from ulma.loop import (DataParallelLoop, data_parallel_accelerator, make_optimizer, my_share, non_finite, set_seed,
                       step_plan, total_steps)
from ulma.losses import weighted
from ulma.methods import Method
from ulma.models import add_lora, is_peft, load_tokenizer, resolve_model_path, trainable_parameters
from ulma.rlhf import losses as RL
from ulma.rlhf.metrics import calibration, pearson, spearman
from ulma.scoring import forward_scores, table_scores

LOSSES = ("bradley_terry", "bce", "mse")


# ------------------------------------------------------------------ data


def resolve_loss(setting: str, examples: list) -> str:
    """``auto`` -> bradley_terry if every example is a pair, mse if any label is a
    continuous score, else bce (binary labels; demonstrations count as z = 1)."""
    if setting != "auto":
        return setting
    if examples and all(e.kind == "pair" for e in examples):
        return "bradley_terry"
    if any(e.kind == "pointwise" and not e.binary for e in examples):
        return "mse"
    return "bce"


def as_pairs(examples: list) -> list:
    """Pairs for Bradley-Terry: pairs as they are, point-wise examples paired within a prompt
    (every higher/lower label combination, :func:`~ulma.data.schema.pointwise_to_pairs`)."""
    pairs = [e for e in examples if e.kind == "pair"]
    return pairs + pointwise_to_pairs(as_kind([e for e in examples if e.kind != "pair"], "pointwise"))


def training_pairs(examples: list) -> list:
    """:func:`as_pairs`, refusing data that yields none."""
    pairs = as_pairs(examples)
    if examples and not pairs:
        raise ConfigError("reward.loss: bradley_terry needs pairs, and the training data has no two responses to "
                          "one prompt with different labels; use reward.loss=bce or mse")
    return pairs


def load_reward_model(model_cfg, tokenizer, device: torch.device):
    """A one-output sequence classifier on ``model_cfg.name_or_path`` (a fresh score head on
    a causal LM, or a reward model to train further), float32, LoRA when enabled."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model_cfg.name_or_path), num_labels=1, dtype=torch.float32,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    # The score is read at the last token that is not padding: the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if model_cfg.lora.enabled:
        model = add_lora(model, model_cfg.lora, task_type="SEQ_CLS")
    return model.to(device)


def unit_losses(loss: str, scores: torch.Tensor, labels: torch.Tensor, positive: torch.Tensor, binary: bool,
                method_cfg) -> torch.Tensor:
    """Per-unit losses ``[B]`` from the scores of a collated batch (pairs: ``[2B]``, chosen first)."""
    if loss == "bradley_terry":
        b = labels.shape[0]
        return RL.bradley_terry_loss(scores[:b], scores[b:])
    if loss == "bce":
        z = labels if binary else positive.float()  # scores -> positive (best-rated) vs the rest
        return RL.binary_reward_loss(scores, z.to(scores.device))
    target = method_cfg.target_scale * (labels - method_cfg.target_offset)  # Eq. 9's z, as for point-wise DPO
    return RL.mse_reward_loss(scores, target.to(scores.device))


# ------------------------------------------------------------------ evaluation


def evaluate_scores(scores: torch.Tensor, ev, labelled: list, loss: str, method_cfg, bins: int = 10) -> dict:
    """Held-out metrics from the scores ``[len(ev.table)]`` of every row of an EvalSet ``ev``.

    ``labelled``: ``(row, label, binary)`` of the held-out point-wise examples (pairs count
    as chosen z=1, rejected z=0).  Spearman against continuous human scores; calibration
    of sigma(r) against binary labels when the model was trained to predict them (bce).
    """
    acc, ties = reward_accuracy(scores, ev.pairs)
    out = {"pair_accuracy": acc, "pair_ties": ties, "pairs": len(ev.pairs), "reward_mean": float(scores.mean()),
           "reward_std": float(scores.std()) if len(scores) > 1 else 0.0}
    if len(ev.units):
        out["loss"] = float(heldout_loss(scores, ev.units, loss, method_cfg).mean())
    cont = [(r, z) for r, z, b in labelled if not b]
    if cont:
        s, z = scores[[r for r, _ in cont]], torch.tensor([z for _, z in cont])
        out.update(spearman=spearman(s, z), pearson=pearson(s, z), scored_examples=len(cont))
    binary = [(r, z) for r, z, b in labelled if b]
    if binary and loss == "bce":
        s, z = scores[[r for r, _ in binary]], torch.tensor([z for _, z in binary])
        out.update(calibration(s, z, bins))
        out["label_accuracy"] = label_accuracy(scores, [(r, z == 1) for r, z in binary])
    return out


def heldout_loss(scores: torch.Tensor, units: Units, loss: str, method_cfg) -> torch.Tensor:
    cols = list(zip(*units.rows))
    rows = torch.tensor([r for col in cols for r in col])
    return unit_losses(loss, scores[rows], torch.tensor(units.labels), torch.tensor(units.positive), units.binary,
                       method_cfg)


def labelled_rows(examples: list, tokenizer, max_length: int, table: SequenceTable) -> list:
    """``(row, label, binary)`` of held-out examples in point-wise form, rows of ``table``
    (already tokenized rows are found again, not added twice)."""
    tok = Tokenizer(tokenizer, max_length)
    return [(tok.add(table, e.prompt, e.response), e.label, e.binary) for e in as_kind(examples, "pointwise")]


# ------------------------------------------------------------------ saving


def save_reward_model(model, tokenizer, folder: Path) -> None:
    """``folder`` as a plain ``AutoModelForSequenceClassification`` checkpoint: LoRA merged
    into the base (the model object is consumed), ``pad_token_id`` in its config."""
    if is_peft(model):
        model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    ckpt.atomic_save_model(Path(folder), model, tokenizer)


# ------------------------------------------------------------------ the loop


class RewardTrainer(DataParallelLoop):
    """Fits r_phi on the training split; evaluates on the held-out split before and after
    (the loop itself: :class:`ulma.loop.Loop`).  Data-parallel over the processes of an
    ``accelerate`` / ``torchrun`` launch (DDP): each takes its slice of every global
    micro-batch of ``micro_batch_size x processes`` units, as the policy loop does."""

    desc = "reward"

    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        self.acc = data_parallel_accelerator("reward")
        self.device = self.acc.device
        self.out = Path(cfg.train.output_dir)
        ckpt.prepare_output(self.out, resume=cfg.train.resume, overwrite=cfg.train.overwrite,
                            delete=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.pad_id = self.tokenizer.pad_token_id
        self._prepare_data()
        # Not train.bf16_frozen_weights: the trained model is saved with LoRA merged into the
        # base, and a base stored in bf16 would round the merged weights (the adapter's delta too).
        self.model = load_reward_model(cfg.model, self.tokenizer, self.device)
        keep_less(self.model, cfg.train, cfg.model.lora, self.device.type)
        self.bf16 = use_bf16(cfg.train.bf16, self.device)
        t, world = cfg.train, self.acc.num_processes
        self.total_steps = total_steps(t, math.ceil(len(self.data.train) / (t.micro_batch_size * world)), t.grad_accum)
        optimizer, self.scheduler = make_optimizer(trainable_parameters(self.model), t, self.total_steps)
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.plan = step_plan(self.data.train, self.total_steps * t.grad_accum, t.micro_batch_size, world, t.seed,
                              t.group_by_length)

    def _prepare_data(self) -> None:
        cfg = self.cfg
        train_ex, eval_ex, skipped = load_split(cfg)
        self.loss = resolve_loss(cfg.reward.loss, train_ex)
        kind = "pair" if self.loss == "bradley_terry" else "pointwise"
        unit_train, unit_eval = train_ex, eval_ex
        if kind == "pair":
            unit_train, unit_eval = training_pairs(train_ex), as_pairs(eval_ex)
        task = Method("reward", None, kind, needs_reference=False)
        self.data = prepare(cfg, self.tokenizer, task, (unit_train, unit_eval, skipped))
        self.labelled = labelled_rows(eval_ex, self.tokenizer, cfg.data.max_length, self.data.eval.table)
        self.data.report.update(loss=self.loss, eval_labelled=len(self.labelled))

    def train_step(self, step: int) -> dict:
        """One optimizer step: the mean unit loss over the step's global micro-batches (weighted
        by the units' weights: sum w*l / sum w)."""
        t, world = self.cfg.train, self.acc.num_processes
        micro = self.plan[step * t.grad_accum : (step + 1) * t.grad_accum]
        n_units = sum(self.data.train.group_weights([i for mb in micro for i in mb])) or 1.0  # all weights 0: loss 0
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct pairs, pairs
        for k, mb in enumerate(micro):
            mine, share = my_share(mb, self.acc.process_index, world)
            batch = collate(self.data.train, mine, self.pad_id, multiple=t.pad_to_multiple_of)
            scores = forward_scores(self.model, batch, self.bf16)
            losses = unit_losses(self.loss, scores, batch["labels"], batch["positive"], self.data.train.binary,
                                 self.cfg.method)
            losses = weighted(losses, batch["weight"].to(losses.device)) * share
            # DDP averages gradients over processes; the loss is already a global mean
            with self.acc.no_sync(self.model) if k < len(micro) - 1 else nullcontext():
                self.acc.backward(losses.sum() / n_units * world)
            sums[0] += losses.sum().detach() / n_units
            if self.loss == "bradley_terry":
                sums[1] += (scores[: len(mine)] > scores[len(mine) :]).sum() * share
                sums[2] += len(mine) * share
        total, correct, pairs = (self.acc.reduce(sums, "sum") if world > 1 else sums).tolist()
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm or math.inf)
        skipped = non_finite(total, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        row = {"loss": total, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0], "skipped": skipped}
        if pairs:
            row["train_pair_accuracy"] = correct / pairs
        return row

    def train_mode(self) -> None:
        self.model.train()

    def postfix(self, row: dict) -> dict:
        return {}

    def evaluate(self, step: int) -> dict:
        scores = table_scores(self.inner, self.data.eval.table, self.pad_id, self.cfg.train.micro_batch_size,
                              self.bf16, self.cfg.train.progress)
        metrics = evaluate_scores(scores, self.data.eval, self.labelled, self.loss, self.cfg.method,
                                  self.cfg.reward.calibration_bins)
        self._log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    def load(self, found: Path) -> dict:
        return ckpt.load_checkpoint(found, self.inner, self.optimizer, self.scheduler)

    def finish(self, results: dict) -> dict:
        results.update(method="reward", loss=self.loss, config=to_dict(self.cfg), data=self.data.report,
                       steps=self.total_steps)
        results["processes"] = self.acc.num_processes
        if self.is_main:
            save_reward_model(self.inner, self.tokenizer, self.out / "final")
            atomic_write_json(self.out / "results.json", results)
        self.acc.wait_for_everyone()
        return results


def train_reward(cfg: Config) -> dict:
    """``ulma train`` with ``method.name: reward``."""
    return RewardTrainer(cfg).run()
