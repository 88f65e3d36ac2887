"""Resume continues the same curve for the other checkpoint paths too: whole state dicts and 4-bit bases.

FuRA (a PEFT adapter checkpoint) goes through a real mid-run kill and a CLI ``--resume`` in test_sft.py. Here
``svd`` (explicit layers: the Trainer saves and reloads the whole state dict, as for ``full`` and ``qfura-nf4``) and
``qlora`` (an adapter over a bitsandbytes 4-bit base, 8-bit AdamW) are checked more cheaply: a finished run's folder
is copied and cut back to what a kill after step 3's log line (before its checkpoint) leaves behind, then resumed.
"""

from __future__ import annotations

import shutil

import pytest

from fura.recipes.sft import run_sft

from .test_sft import make_settings, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["svd", "qlora"])
def test_resume_matches_an_uninterrupted_run(tiny_model_dir, commonsense_dir, tmp_path, method) -> None:
    flags = {"max_steps": 3, "save_steps": 2, "val_set_size": 0, "max_rows_per_file": 6}
    run_sft(make_settings(tiny_model_dir, commonsense_dir, tmp_path / "straight", method, **flags))

    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight", killed)
    for leftover in ("checkpoints/checkpoint-3", "adapter", "model"):
        shutil.rmtree(killed / leftover, ignore_errors=True)
    (killed / "results.json").unlink()
    run_sft(make_settings(tiny_model_dir, commonsense_dir, killed, method, resume=True, **flags))

    expected, resumed = train_losses(tmp_path / "straight"), train_losses(killed)
    assert list(resumed) == [1, 2, 3]
    assert resumed == pytest.approx(expected, abs=1e-5)
