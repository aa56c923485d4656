"""Training from Python: ``ulma.train(config, data=..., model=...)``.

The same run as ``ulma train CONFIG key=value ...``, with in-memory pieces in place of the
config's: rows (a list of dicts, a ``datasets.Dataset`` or a pandas DataFrame in any format
``ulma`` reads from files), and a model or tokenizer object::

    import ulma

    rows = [{"prompt": "How do I bake bread?", "completion": "Mix flour, water, yeast...", "label": 1},
            {"prompt": "How do I pick a lock?", "completion": "Sure, first...", "label": 0}, ...]
    results = ulma.train("ulma", data=rows, model="Qwen/Qwen2.5-0.5B-Instruct",
                         overrides=["train.output_dir=runs/mine", "train.max_steps=100"])
    results["after"]["eval_loss"]

Returns the run's results (``OUTPUT_DIR/results.json``); the model is in ``OUTPUT_DIR/final``.
"""

from __future__ import annotations

from pathlib import Path

from ulma.config import Config, ConfigError, from_dict, load_config


def train(config: Config | dict | str | Path | None = None, *, data=None, eval_data=None, model=None,
          tokenizer=None, overrides: list[str] | tuple = ()) -> dict:
    """Train one run and return its results.

    config: a :class:`~ulma.config.Config`, a mapping of sections, a YAML file, or the name
        of a shipped config (``"ulma"``, ``"dpo"``; ``ulma configs`` lists them); None = defaults.
    data: training rows in memory, read with ``data.train.options`` (columns, kind,
        label_range); None = the config's ``data.train`` source.
    eval_data: held-out rows likewise; None = ``data.eval``, or a split of the training rows.
    model: a model id / folder, or a loaded ``AutoModelForCausalLM`` (its weights are trained
        in float32); None = ``model.name_or_path``.
    tokenizer: a loaded tokenizer; None = the model's (its ``name_or_path``).
    overrides: ``section.key=value`` strings applied on top, as on the command line.
    """
    from ulma.methods import LOOPS
    from ulma.trainer import Trainer

    cfg = _config(config, overrides)
    if isinstance(model, (str, Path)):
        cfg.model.name_or_path, model = str(model), None
    elif model is not None:
        cfg.model.name_or_path = getattr(model, "name_or_path", None) or model.config._name_or_path
        if tokenizer is None:
            from ulma.models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.name_or_path)
    if cfg.method.name in LOOPS and (model is not None or data is not None or eval_data is not None):
        raise ConfigError(f"method {cfg.method.name!r}: pass its model and data in the config "
                          "(in-memory objects are for the policy methods)")
    if cfg.method.name in LOOPS:
        from ulma.trainer import train as run

        return run(cfg)
    examples = _examples(cfg, data, eval_data) if data is not None or eval_data is not None else None
    return Trainer(cfg, model=model, tokenizer=tokenizer, examples=examples).run()


def _config(config, overrides) -> Config:
    if isinstance(config, Config):
        if overrides:
            from ulma.config import load_raw, to_dict

            return from_dict(Config, _merge(to_dict(config), load_raw(None, overrides)))
        return config
    if isinstance(config, dict):
        from ulma.config import load_raw

        return from_dict(Config, _merge(dict(config), load_raw(None, overrides)))
    return load_config(config, overrides)


def _merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


def _examples(cfg: Config, data, eval_data) -> tuple:
    """(train examples, held-out examples or None, skipped rows) of in-memory rows."""
    from ulma.data.prepare import load_examples
    from ulma.data.sources.generic import load_records

    def load(rows, name, source):
        if rows is None:
            return load_examples(source, cfg.data.on_error) if source is not None else (None, [])
        result = load_records(rows, name=name, on_error=cfg.data.on_error, **cfg.data.train.options)
        return result.examples, result.skipped

    train_ex, skipped = load(data, "data", cfg.data.train)
    eval_ex, eval_skipped = load(eval_data, "eval_data", cfg.data.eval)
    return train_ex, eval_ex, skipped + eval_skipped
