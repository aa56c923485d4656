"""Scoring (prompt, response) text with a saved scalar reward model.

Neutral ground: evaluation (the ``reward`` judge) and PPO both score with
:class:`RewardScorer`; training one (:mod:`ulma.rlhf.reward`) uses its :func:`forward_scores`.
A reward model folder is a plain ``AutoModelForSequenceClassification`` (``num_labels=1``)
with its tokenizer beside it; its score is read at the last non-padding token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ulma.data.schema import make_prompt, user_prompt
from ulma.data.tokenize import SequenceTable, Tokenizer, pad_rows
from ulma.logprobs import autocast
from ulma.models import load_tokenizer, place


def forward_scores(model, batch: dict, bf16: bool) -> torch.Tensor:
    """r(x, y) for every row of a padded batch: ``[N]`` float32."""
    device = next(model.parameters()).device
    with autocast(device, bf16):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, 0].float()


@torch.no_grad()
def table_scores(model, table: SequenceTable, pad_id: int, batch_size: int, bf16: bool, progress: bool = False):
    """Scores of every row of a table, ``[len(table)]``, longest rows first (less padding)."""
    from tqdm.auto import tqdm

    out = torch.zeros(len(table))
    order = sorted(range(len(table)), key=lambda r: -len(table.sequences[r].input_ids))
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress, leave=False):
        chunk = order[s : s + batch_size]
        out[chunk] = forward_scores(model, pad_rows(table, chunk, pad_id), bf16).cpu()
    model.train(was_training)
    return out


def _as_prompt(prompt):
    return user_prompt(prompt) if isinstance(prompt, str) else make_prompt(prompt)


class RewardScorer:
    """Scores (prompt, response) text with a saved reward model: ``score(...) -> Tensor [N]``.

    The text is rendered with the reward model's OWN tokenizer and chat template (prompt
    cut from the left to ``max_length`` and counted in ``prompts_truncated``), so the
    policy's tokenizer may differ.  A prompt is a string (one user turn) or chat turns.
    With ``bf16`` (autocast) and ``bf16_weights`` its Linear weights are stored in bf16:
    the same products at half the memory (it is frozen).
    """

    def __init__(self, folder: str | Path, device: torch.device | None = None, max_length: int = 512,
                 batch_size: int = 8, bf16: bool = False, bf16_weights: bool = True):
        from transformers import AutoModelForSequenceClassification

        folder = Path(folder)
        check_reward_folder(folder)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        # every forward runs under bf16 autocast: the same products from bf16 weights
        frozen = torch.bfloat16 if bf16 and bf16_weights else None
        self.model = place(model.requires_grad_(False), self.device, frozen)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {folder}: num_labels={self.model.config.num_labels}, expected 1 (a scalar)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.encoder = Tokenizer(self.tokenizer, max_length)
        self.batch_size, self.bf16 = batch_size, bf16
        self.prompts_truncated = 0

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        table = SequenceTable()
        rows = [self.encoder.add(table, _as_prompt(p), r) for p, r in zip(prompts, responses)]
        self.prompts_truncated += table.prompt_truncated
        scores = table_scores(self.model, table, self.model.config.pad_token_id, self.batch_size, self.bf16)
        return scores[rows]

    def __call__(self, prompts: list, responses: list[str], token_ids=None) -> torch.Tensor:
        """The PPO reward interface: ``(prompts, response texts, response token ids) -> [N]``."""
        return self.score(prompts, responses)


def check_reward_folder(folder: Path) -> None:
    """Fail early, naming the folder, when it cannot be a saved reward model."""
    if not folder.is_dir():
        raise FileNotFoundError(f"reward model folder {folder} does not exist (train one with method.name=reward)")
    if not (folder / "config.json").exists():
        hint = " (it holds a LoRA adapter: merge it, as method.name=reward does)" if (folder / "adapter_config.json").exists() else ""
        raise ValueError(f"reward model folder {folder} has no config.json{hint}")
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"reward model folder {folder} has no tokenizer: it must score text with its own tokenizer; "
                         "save the tokenizer beside the model")
