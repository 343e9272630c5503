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
    for step, complete in ((2, True), (10, True), (12, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:  # the Trainer writes trainer_state.json last
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(folder / "checkpoint-10")  # 10 > 2 numerically, 12 incomplete
