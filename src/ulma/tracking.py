"""``train.report_to``: experiment trackers beside ``metrics.jsonl``, through accelerate.

The policy loop hands the names to ``Accelerator(log_with=...)``; the reward and PPO loops
start the same tracker classes through :func:`start_trackers`.  Every loop gives them each
``metrics.jsonl`` row, at its ``step``, and nothing else (:meth:`ulma.loop.Loop._log`).  Local trackers
(tensorboard, aim, ...) write under ``OUTPUT/logs/``: TensorBoard's events are in
``OUTPUT/logs/ulma/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ulma.errors import ConfigError

PROJECT = "ulma"  # the trackers' project name (a wandb project, TensorBoard's sub-folder)
LOG_DIR = "logs"  # under train.output_dir
# pip extras of ulma (pyproject.toml) for the trackers users ask for most; the others name their package
EXTRAS = {"tensorboard": "ulma[tensorboard]", "wandb": "ulma[wandb]"}


def known_trackers() -> list[str]:
    from accelerate.utils import LoggerType

    return [t for t in LoggerType.list() if t != "all"]


def check_trackers(names: list[str]) -> None:
    """Each name is one of accelerate's trackers and its package is installed (accelerate
    itself would skip a missing one with a debug message): a ConfigError naming what to install."""
    from accelerate.tracking import get_available_trackers

    known = known_trackers()
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from {known}")
        if name not in available:
            raise ConfigError(f"train.report_to: {name} is not installed: pip install '{EXTRAS.get(name, name)}' "
                              f"(or remove {name} from train.report_to)")


def tracker_config(config: dict) -> dict:
    """The run's config as one flat mapping of dotted keys to scalars (TensorBoard's
    hyper-parameters take bool, str, float, int or None; lists are written as JSON)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update({f"{key}.{k}": v for k, v in tracker_config(value).items()})
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value)
    return flat


def tracker_values(row: dict) -> dict:
    """The numbers of a metrics row, NaN included (a skipped step's gradient norm); not its
    None values (a step without negatives has ``loss_neg: None``) nor the step, given apart."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def init_kwargs(output_dir: str | Path, resumed_step: int = 0) -> dict:
    """Per-tracker start options: a wandb run is named after the output folder and keeps its
    local files there (not in ./wandb of wherever ulma was started); a run resumed at step k
    has TensorBoard discard its events after k (``purge_step``), as metrics.jsonl drops its
    rows after k: the replayed steps replace them."""
    kwargs = {"wandb": {"name": Path(output_dir).name, "dir": str(output_dir)}}
    if resumed_step:
        kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
    return kwargs


def start_trackers(names: list[str], output_dir: str | Path, config: dict, resumed_step: int = 0) -> list:
    """accelerate's tracker objects for a loop without an Accelerator (what
    ``Accelerator.init_trackers`` builds), started and given the config."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        kwargs = init_kwargs(output_dir, resumed_step).get(name, {})
        if cls.requires_logging_directory:
            tracker = cls(PROJECT, Path(output_dir) / LOG_DIR, **kwargs)
        else:
            tracker = cls(PROJECT, **kwargs)
        tracker.start()
        tracker.store_init_configuration(tracker_config(config))
        trackers.append(tracker)
    return trackers


def accelerator_kwargs(names: list[str], output_dir: str | Path) -> dict:
    """``Accelerator(**...)`` for ``train.report_to``: the trackers, logging under ``OUTPUT/logs``."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(output_dir)
    return {"log_with": list(names), "project_config": ProjectConfiguration(project_dir=str(out),
                                                                           logging_dir=str(out / LOG_DIR))}


def init_accelerator_trackers(acc, names: list[str], output_dir: str | Path, config: dict,
                              resume_from: Path | None = None) -> None:
    """Start the Accelerator's trackers; ``resume_from``: the checkpoint a resumed run starts from."""
    if names:
        step = json.loads((resume_from / "state.json").read_text())["step"] if resume_from else 0
        acc.init_trackers(PROJECT, config=tracker_config(config), init_kwargs=init_kwargs(output_dir, step))


def finish_trackers(trackers: list) -> None:
    """Close each tracker (flush and end the run).  Not ``Accelerator.end_training``, which
    also destroys the process group: that is left to the command (ulma.cli), after a run
    that ended well."""
    for tracker in trackers:
        tracker.finish()
