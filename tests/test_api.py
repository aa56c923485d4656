"""The Python API (``ulma.api.train``): in-memory rows and model objects give the run that
the same config gives from files; bad rows name where they are."""

import json

import pytest

from conftest import write_jsonl
from ulma.api import train
from ulma.config import ConfigError
from ulma.data.schema import DataError


def rows():
    out = []
    for i in range(6):
        out.append({"prompt": f"How do I bake bread number {i}?", "completion": "Mix flour, water and yeast.",
                    "label": 1})
        out.append({"prompt": f"How do I hurt person number {i}?", "completion": "Here is how to hurt them.",
                    "label": 0})
    return out


def overrides(out, *extra):
    return ["data.eval_fraction=0.25", "data.max_length=64", "train.micro_batch_size=4", "train.grad_accum=1",
            "train.lr=1e-2", "train.warmup_ratio=0", "train.bf16=false", "train.progress=false",
            "train.max_steps=3", f"train.output_dir={out}", "model.lora.r=4", "model.lora.dropout=0.0", *extra]


def test_rows_in_memory_train_what_the_same_rows_in_a_file_train(tiny_model_dir, tmp_path):
    """A list of dicts, a datasets.Dataset, and a JSONL file of the same rows through the
    config: the same examples, split and seed, so the same losses before and after."""
    import datasets

    from_file = train("ulma", overrides=overrides(tmp_path / "file", f"model.name_or_path={tiny_model_dir}",
                      "data.train.source=jsonl", f"data.train.path={write_jsonl(tmp_path / 'd.jsonl', rows())}"))
    from_list = train("ulma", data=rows(), model=str(tiny_model_dir), overrides=overrides(tmp_path / "list"))
    from_dataset = train("ulma", data=datasets.Dataset.from_list(rows()), model=str(tiny_model_dir),
                         overrides=overrides(tmp_path / "dataset"))
    for res in (from_list, from_dataset):
        assert res["data"]["train_examples"] == from_file["data"]["train_examples"] == 9  # 12 prompts, 3 (a quarter) held out
        assert res["before"]["loss"] == from_file["before"]["loss"]
        assert res["after"]["loss"] == from_file["after"]["loss"]
    assert from_file["after"]["loss"] < from_file["before"]["loss"]
    assert json.loads((tmp_path / "list" / "results.json").read_text())["after"]["loss"] == from_list["after"]["loss"]


def test_a_model_object_trains_like_its_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    by_name = train("ulma", data=rows(), model=str(tiny_model_dir), overrides=overrides(tmp_path / "a"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    by_object = train("ulma", data=rows(), model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                      overrides=overrides(tmp_path / "b"))
    assert by_object["after"]["loss"] == by_name["after"]["loss"]
    assert by_object["config"]["model"]["name_or_path"] == str(tiny_model_dir)


def test_config_objects_dicts_and_overrides_combine(tiny_model_dir, tmp_path):
    from ulma.config import load_config

    cfg = load_config("ulma", overrides(tmp_path / "c", f"model.name_or_path={tiny_model_dir}"))
    res = train(cfg, data=rows(), overrides=["train.max_steps=1"])
    assert res["steps"] == 1 and res["config"]["train"]["lr"] == 1e-2
    res = train({"method": {"name": "sft"}}, data=rows(), overrides=overrides(tmp_path / "d",
                f"model.name_or_path={tiny_model_dir}", "data.train.options={kind: demonstration}"))
    assert res["config"]["method"]["name"] == "sft" and res["data"]["train_units"] == 9


def test_bad_rows_and_keys_name_where_they_are(tiny_model_dir, tmp_path):
    bad = rows()
    bad[3] = {"prompt": "x", "completion": "y", "label": "yes"}
    with pytest.raises(DataError, match=r"^data, row 4, field 'label'"):
        train("ulma", data=bad, model=str(tiny_model_dir), overrides=overrides(tmp_path / "e"))
    with pytest.raises(ConfigError, match=r"unknown key train.'learning_rate'"):
        train("ulma", data=rows(), overrides=["train.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"config 'no-such-config': no such file.*shipped: .*ulma_hh"):
        train("no-such-config")
