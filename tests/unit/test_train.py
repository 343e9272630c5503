"""Shared training helpers: the global-batch arithmetic, precision on CPU, and which checkpoint a
killed run resumes from."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, TrainSection
from pipeline.train import gradient_accumulation, last_checkpoint, precision


def test_accumulation_is_derived_from_the_global_batch():
    train = TrainSection(global_batch_size=512, per_device_batch_size=8)
    assert gradient_accumulation(train, processes=8) == 8
    assert gradient_accumulation(train, processes=1) == 64
    with pytest.raises(ConfigError, match=r"global_batch_size=512 is not divisible by processes \(3\)"):
        gradient_accumulation(train, processes=3)


def test_cpu_runs_in_fp32_and_refuses_half_precision():
    flags = precision(TrainSection())
    assert flags == {"bf16": False, "fp16": False, "use_cpu": True}
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a GPU"):
        precision(TrainSection(precision="bf16"))


def test_resume_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    assert last_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    # The Trainer writes trainer_state.json last; a kill can land before it or halfway through it.
    for step, state in ((2, "{}"), (10, "{}"), (12, None), (14, ""), (16, '{"global_step": 1')):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(folder / "checkpoint-10")  # 10 > 2 numerically; 12-16 cut off


def _sft_recipe(tmp_path, trl: dict):
    """An sft recipe (validated the way `rlhf validate` does) with `train.trl` set."""
    from pipeline.stages import recipe_for

    tree = {"stage": "sft", "run": {"name": "t", "root": str(tmp_path)}, "model": str(tmp_path / "m"),
            "inputs": {"dataset": str(tmp_path / "d")}, "train": {"trl": trl}}
    return recipe_for(tree, "r.yaml")


def test_unknown_trl_field_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.trl\.no_such_field: SFTConfig has no field"):
        _sft_recipe(tmp_path, {"no_such_field": 1})


def test_bad_trl_value_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.trl\.optim: SFTConfig refuses 'adamw_nope'"):
        _sft_recipe(tmp_path, {"optim": "adamw_nope"})


def test_a_trl_key_we_derive_names_both_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.trl\.lr_scheduler_type: .* derived from train\.lr_scheduler"):
        _sft_recipe(tmp_path, {"lr_scheduler_type": "cosin"})
    from trl import SFTConfig

    from pipeline.train import trl_config

    train = TrainSection(trl={"max_length": 64})
    with pytest.raises(ConfigError, match=r"train\.trl\.max_length: .* set by the SFTConfig stage"):
        trl_config(SFTConfig, train, tmp_path, max_length=128)


def test_a_valid_trl_field_reaches_the_trl_config(tmp_path):
    from trl import SFTConfig

    from pipeline.train import trl_config

    recipe = _sft_recipe(tmp_path, {"max_grad_norm": 0.25, "packing": True})
    args = trl_config(SFTConfig, recipe.train, tmp_path, max_length=64)
    assert args.max_grad_norm == 0.25 and args.packing is True
    assert args.max_length == 64 and args.gradient_accumulation_steps == 2  # derived fields still there


def test_validating_a_recipe_without_train_trl_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys; from pipeline.stages import load_recipe; "
            "load_recipe('recipes/demo-tiny/sft.yaml', check_inputs=False); print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_lora_top_layers_puts_adapters_on_the_last_layers_only(tiny_pool):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.config import ConfigError
    from pipeline.train import lora_config

    model = AutoModelForCausalLM.from_pretrained(str(tiny_pool[0]))
    total = model.config.num_hidden_layers
    train = TrainSection(lora={"r": 4, "alpha": 8, "top_layers": 1})
    peft_model = get_peft_model(model, lora_config(train, "CAUSAL_LM", model))
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, _ in peft_model.named_parameters()
               if "lora_" in name}
    assert adapted == {total - 1}
    with pytest.raises(ConfigError, match=f"top_layers={total + 1}: the model has {total} layers"):
        lora_config(TrainSection(lora={"top_layers": total + 1}), "CAUSAL_LM", model)
    assert lora_config(TrainSection(lora={"r": 4}), "CAUSAL_LM", model).layers_to_transform is None
