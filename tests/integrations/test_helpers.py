"""Single-process tests of :mod:`fura.integrations.distributed` and the ready accelerate configs (no process group
needed)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

import fura
from fura.integrations import distributed
from fura.recipes import runs
from fura.recipes.runs import RunFolder
from fura.tuner.layer import FuraLinear

from ..conftest import tiny_llama_config
from .conftest import CONFIGS


@pytest.fixture
def rank_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be rank 1 of 2 (as ``torchrun`` sets it)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def _fura_model() -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), fura.FuraConfig(target_modules=["q_proj", "v_proj"]))


def test_ranks_come_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch, rank_one: None) -> None:
    assert (distributed.rank(), distributed.world_size()) == (1, 2)
    assert distributed.is_distributed() and not distributed.is_main_process()
    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    assert distributed.use_cpu_backend()
    monkeypatch.setattr(distributed, "has_accelerator", lambda: True)
    assert not distributed.use_cpu_backend()


def test_single_process_is_main_and_never_forces_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.is_main_process() and not distributed.is_distributed()
    assert not distributed.use_cpu_backend()


def test_other_ranks_neither_prepare_nor_log_into_the_run_folder(tmp_path: Path, rank_one: None) -> None:
    run = RunFolder(tmp_path / "run")
    assert runs.prepare_run_folder(run) is None
    with runs.main_process_log(run.log_path):
        pass
    assert not run.root.exists()


def test_other_ranks_resume_from_the_checkpoint_the_main_process_sees(tmp_path: Path, rank_one: None) -> None:
    run = RunFolder(tmp_path / "run")
    checkpoint = run.checkpoints_dir / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    (checkpoint / "trainer_state.json").write_text("{}")
    (run.metrics_path).write_text('{"step": 4}\n{"step": 5}\n')
    assert runs.prepare_run_folder(run, resume=True) == checkpoint
    assert run.metrics_path.read_text().count("step") == 2  # only the main process truncates the metrics


def test_zero3_marks_fura_layers_as_leaf_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fura_model()  # built first: the ZeRO-3 gathering of the init is covered by tests/test_integrations.py
    calls = []
    utils = types.SimpleNamespace(set_z3_leaf_modules=lambda model, classes: calls.append((model, classes)))
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(utils=utils))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)
    assert distributed.prepare_model_for_sharding(model) is model
    assert calls == [(model, [FuraLinear])]


def test_without_zero3_sharding_preparation_is_a_no_op() -> None:
    model = _fura_model()
    assert distributed.prepare_model_for_sharding(model) is model  # deepspeed is not even imported


def _fake_trainer(model: nn.Module, version: int, use_orig_params: bool) -> types.SimpleNamespace:
    plugin = types.SimpleNamespace(fsdp_version=version, use_orig_params=use_orig_params, auto_wrap_policy="config")
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    return types.SimpleNamespace(is_fsdp_enabled=True, model=model, accelerator=accelerator)


def test_fsdp1_trainer_gets_the_fura_policy_and_needs_use_orig_params() -> None:
    model = _fura_model()
    with pytest.raises(ValueError, match="use_orig_params=True"):
        distributed.configure_trainer_for_fsdp(_fake_trainer(model, 1, use_orig_params=False))
    trainer = _fake_trainer(model, 1, use_orig_params=True)
    distributed.configure_trainer_for_fsdp(trainer)
    assert callable(trainer.accelerator.state.fsdp_plugin.auto_wrap_policy)
    fsdp2 = _fake_trainer(model, 2, use_orig_params=False)
    distributed.configure_trainer_for_fsdp(fsdp2)  # FSDP2 wraps per block from the config: untouched
    assert fsdp2.accelerator.state.fsdp_plugin.auto_wrap_policy == "config"


def test_global_grad_norm_of_an_unsharded_model() -> None:
    model = _fura_model()
    assert distributed.global_grad_norm(model) is None
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert distributed.global_grad_norm(model) == pytest.approx(float(expected), rel=1e-6)


def test_save_trained_model_writes_a_given_gathered_state_dict(tmp_path: Path) -> None:
    from fura.recipes.artifacts import save_trained_model
    from fura.recipes.loading import MethodInfo

    model = _fura_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if "fura_core" in k and k.endswith("weight"))
    state[key] += 1.0  # what a gathered state dict says wins over the model's own tensors
    info = MethodInfo("fura", "commonsense", "fura", 0, 0, {}, {}, save_format="adapter", quantized=False)
    save_trained_model(model, info, tmp_path / "adapter", state_dict=state)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved[key.replace(".default", "")], state[key])


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED")]
)
def test_ready_accelerate_configs_load_and_document_their_command(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.num_processes == 2
    header = (CONFIGS / name).read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}" in header and "-m fura_cli train sft" in header
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":
        assert config.mixed_precision is None  # accelerate refuses it next to a deepspeed_config_file
        assert (CONFIGS.parents[1] / config.deepspeed_config["deepspeed_config_file"]).is_file()


def test_zero3_json_is_stage_3_with_16bit_gathering_on_save() -> None:
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    path = CONFIGS / "zero3.json"
    json.loads(path.read_text())
    config = HfDeepSpeedConfig(str(path))
    assert config.is_zero3()
    assert config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
    assert config.get_value("train_micro_batch_size_per_gpu") == "auto"  # the pipeline's flags decide


def test_an_fsdp_launch_that_accelerate_turned_into_ddp_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for fsdp.yaml, on CPU too
    trainer = types.SimpleNamespace(is_fsdp_enabled=False, model=_fura_model())
    with caplog.at_level("WARNING", logger="fura.integrations.distributed"):
        distributed.configure_trainer_for_fsdp(trainer)
    assert "plain DDP" in caplog.text
