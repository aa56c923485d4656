import pytest

from ulma.config import ConfigError, load_config, validate


def test_defaults_are_the_papers():
    cfg = load_config(None)
    assert (cfg.method.beta, cfg.method.log_z, cfg.train.lr) == (0.1, 0.0, 1e-5)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 32, 0.1)
    assert cfg.train.micro_batch_size * cfg.train.grad_accum == 64


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: {name: dpo, beta: 0.2}\ntrain: {lr: 1e-4}\n")
    cfg = load_config(p, ["train.micro_batch_size=4", "model.lora.enabled=false", "data.train.options={as: pointwise}"])
    assert (cfg.method.name, cfg.method.beta, cfg.train.lr) == ("dpo", 0.2, 1e-4)
    assert cfg.train.micro_batch_size == 4 and cfg.model.lora.enabled is False
    assert cfg.data.train.options == {"as": "pointwise"}


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {learning_rate: 1e-4}\n")
    with pytest.raises(ConfigError, match="unknown key train.'learning_rate'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key model.lora.'rank'"):
        load_config(None, ["model.lora.rank=4"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected int, got 'eight'"):
        load_config(None, ["train.micro_batch_size=eight"])
    with pytest.raises(ConfigError, match=r"method.logp_reduction: 'avg' is not one of \['sum', 'mean', 'auto'\]"):
        load_config(None, ["method.logp_reduction=avg"])
    with pytest.raises(ConfigError, match="method.name: unknown method 'ulmaa'"):
        validate(load_config(None, ["method.name=ulmaa"]))
    with pytest.raises(ConfigError, match="method.beta: must be > 0"):
        validate(load_config(None, ["method.beta=0"]))
    with pytest.raises(ConfigError, match="train.forward_batch_size: must be >= 1 or null"):
        validate(load_config(None, ["train.forward_batch_size=0"]))
    default = load_config(None, []).train
    assert default.micro_batch_size == 8
    assert (default.forward_rows("cpu"), default.forward_rows("cuda")) == (8, 32)  # the micro-batch; 4x on CUDA
    set12 = load_config(None, ["train.forward_batch_size=12"]).train
    assert (set12.forward_rows("cpu"), set12.forward_rows("cuda")) == (12, 12)
    assert load_config(None, ["train.bf16=auto"]).train.bf16 == "auto"
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config(None, ["train.bf16=maybe"])


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_config_file_loads_and_every_line_is_commented():
    import dataclasses
    from pathlib import Path

    import yaml

    from ulma.config import Config

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 11
    for f in files:
        validate(load_config(f))
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip() and ":" in line and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{f.name}:{n} has no comment: {line!r}"
    # configs/ulma.yaml documents every key there is
    full = yaml.safe_load((root / "ulma.yaml").read_text())
    defaults = dataclasses.asdict(Config())
    documented = set(_leaf_keys(full)) | {"data.eval"}
    assert set(_leaf_keys(defaults)) <= documented


def test_the_values_written_in_ulma_yaml_are_the_defaults():
    """configs/ulma.yaml shows every key with its default: it loads to exactly Config()."""
    from pathlib import Path

    from ulma.config import Config

    path = Path(__file__).resolve().parents[1] / "configs" / "ulma.yaml"
    assert load_config(path) == Config()


def test_shipped_configs_name_no_local_folder_and_run_on_local_copies_by_override():
    """The method configs read the hub (a user has no ../shared); pointed at the offline
    copies with one override, as CI does, they load the data they name."""
    import pytest

    from conftest import SHARED
    from ulma.config import CONFIGS, packaged_configs
    from ulma.data.prepare import load_split

    for name in packaged_configs():
        assert "shared" not in (CONFIGS / f"{name}.yaml").read_text(), name
    hh = SHARED / "data" / "hh-rlhf" / "harmless-base-test.part.jsonl.gz"
    if not hh.exists():
        pytest.skip("../shared/data is not here")
    hub_hh = [n for n in packaged_configs() if load_config(n).data.train.source == "hh"
              and load_config(n).data.train.path is None]
    assert {"dpo", "sft", "ulma_hh", "unlearning", "unlikelihood", "positive_dpo", "negative_dpo"} <= set(hub_hh)
    for name in hub_hh:
        cfg = load_config(name, [f"data.train.path={hh}"])
        train_ex, eval_ex, skipped = load_split(cfg)
        # 1,800 rows, 6 malformed (skipped, counted); HH pairs, or 2 point-wise rows a pair
        assert len(skipped) == 6 and len(train_ex) + len(eval_ex) in (1794, 2 * 1794), name
    qa = SHARED / "data" / "qa-feedback" / "dev_feedback.part.json"
    train_ex, eval_ex, _ = load_split(load_config("pointwise_dpo", [f"data.train.path={qa}"]))
    examples = train_ex + eval_ex  # 400 records: 390 human-corrected answers, 395 answers with marked errors
    assert (len(examples), sum(e.label for e in examples)) == (785, 390)
