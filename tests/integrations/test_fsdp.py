"""FSDP with FuRA models.

* On CPU (gloo), outside the Trainer: ``torchrun`` runs ``fsdp_worker.py`` in 2 processes. FSDP2 (``fully_shard`` per
  decoder layer) and FSDP1 (FuRA-aware auto-wrap policy, ``use_orig_params=True``) give the losses, gradient norms and
  adapter file of an unsharded run. ``accelerate`` itself cannot run FSDP on a CPU: it enables FSDP only for GPU-type
  launches (an FSDP config on a CPU-only machine runs plain DDP), so the Trainer-based SFT pipeline with
  ``configs/accelerate/fsdp.yaml`` is tested on a GPU (``cuda`` marker).
* Unit tests of the wrap policies: PEFT's ``fsdp_auto_wrap_policy`` gives every ``FuraCore`` its own unit, which FSDP
  never unshards because ``FuraLayer`` reads the core directly (the worker shows the resulting failure);
  :func:`fura.integrations.distributed.fsdp_auto_wrap_policy` keeps the cores in their decoder layer's unit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fura
from fura.integrations import distributed
from fura.tuner.layer import FuraBasis, FuraCore

from ..conftest import tiny_llama_config
from .conftest import CONFIGS, PYTHON, finish, free_port, start
from .test_ddp import records, sft_args

WORKER = Path(__file__).with_name("fsdp_worker.py")
LOSS_ATOL = 1e-5
ADAPTER_ATOL = 1e-6


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Results and output folder of one 2-process ``fsdp_worker.py`` run (all scenarios)."""
    out = tmp_path_factory.mktemp("fsdp-cpu")
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    process = start([*command, str(WORKER), str(tiny_model_dir), str(out)], out / "worker.log")
    finish(process, out / "worker.log")
    return json.loads((out / "results.json").read_text()), out


def assert_same_adapter(left: Path, right: Path) -> None:
    one, two = load_file(left / "adapter_model.safetensors"), load_file(right / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and one
    for key, tensor in one.items():
        assert two[key].dtype == tensor.dtype and two[key].shape == tensor.shape, key
        assert torch.allclose(two[key], tensor, rtol=0.0, atol=ADAPTER_ATOL), key


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp1"])
def test_fsdp_on_cpu_matches_the_unsharded_run(worker: tuple[dict, Path], scenario: str) -> None:
    results, out = worker
    assert results["world_size"] == 2
    sharded, reference = results[scenario], results["reference"]
    assert "error" not in sharded, sharded.get("error")
    for one, two in zip(reference["loss"], sharded["loss"], strict=True):
        assert abs(one - two) <= LOSS_ATOL
    assert sharded["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert reference["loss"][0] != reference["loss"][-1]
    assert_same_adapter(out / "reference", out / scenario)


def test_fura_policy_keeps_cores_in_their_decoder_layer_unit(worker: tuple[dict, Path]) -> None:
    info = worker[0]["fsdp1"]
    assert info["cores"] > 0 and info["core_units"] == 0


def test_peft_policy_trains_fura_with_fsdp1(worker: tuple[dict, Path]) -> None:
    """PEFT's policy gives each FuraCore its own FSDP1 unit; the layer calls the core, so it is gathered."""
    info = worker[0]["fsdp1_peft_policy"]
    assert info["core_units"] == info["cores"] > 0
    assert "error" not in info, info.get("error")


def _fura_model():
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), fura.FuraConfig(target_modules=["q_proj", "v_proj"]))


def wrapped_types(policy, model) -> set[type]:
    """Module types the FSDP1 policy gives their own unit (asked per module, as FSDP's auto-wrap does)."""
    return {type(m) for m in model.modules() if m is not model and policy(module=m, recurse=False, nonwrapped_numel=1)}


def test_peft_fsdp_auto_wrap_policy_wraps_each_fura_core_separately() -> None:
    from peft.utils.other import fsdp_auto_wrap_policy

    model = _fura_model()
    policy = fsdp_auto_wrap_policy(model)
    cores = [m for m in model.modules() if isinstance(m, FuraCore)]
    assert len(cores) == 4  # 2 layers x (q_proj, v_proj)
    assert all(policy(module=core, recurse=False, nonwrapped_numel=1) for core in cores)
    assert FuraBasis not in wrapped_types(policy, model)  # frozen: no trainable weight
    assert LlamaDecoderLayer in wrapped_types(policy, model)


def test_fura_fsdp_auto_wrap_policy_wraps_blocks_and_lora_leaves_but_not_fura_cores() -> None:
    fura_types = wrapped_types(distributed.fsdp_auto_wrap_policy(_fura_model()), _fura_model())
    assert LlamaDecoderLayer in fura_types and FuraCore not in fura_types
    torch.manual_seed(0)
    lora = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(target_modules=["q_proj"], r=4))
    lora_types = wrapped_types(distributed.fsdp_auto_wrap_policy(lora), lora)
    assert torch.nn.Linear in lora_types  # lora_A / lora_B, as PEFT's policy does
    assert LlamaDecoderLayer in lora_types


def test_unwrapped_module_names_strips_fsdp1_segments() -> None:
    model = torch.nn.Sequential()
    model.add_module("_fsdp_wrapped_module", torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with distributed.unwrapped_module_names(model):
        assert [name for name, _ in model.named_modules()] == ["", "", "0"]
    assert [name for name, _ in model.named_modules()] == ["", "_fsdp_wrapped_module", "_fsdp_wrapped_module.0"]


@pytest.mark.cuda
def test_fsdp_sft_pipeline_on_gpus_matches_a_single_process_run(
    tiny_model_dir: Path, sft_data_file: Path, tmp_path: Path
) -> None:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (FSDP2) of ``fura train sft`` on the GPUs."""
    processes = min(2, torch.cuda.device_count())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = start([PYTHON, *sft_args(tiny_model_dir, sft_data_file, tmp_path / "single", 4)], tmp_path / "s.log", env)
    finish(single, tmp_path / "s.log")
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml")]
    launch += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    accum = 4 // processes
    fsdp = start([*launch, *sft_args(tiny_model_dir, sft_data_file, tmp_path / "fsdp", accum)], tmp_path / "f.log", env)
    finish(fsdp, tmp_path / "f.log")
    (one, _), (two, _) = records(tmp_path / "single"), records(tmp_path / "fsdp")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)  # GPU kernels differ with the batch split
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    single_adapter = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    fsdp_adapter = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert sorted(single_adapter) == sorted(fsdp_adapter)
    for key, tensor in single_adapter.items():
        assert torch.allclose(fsdp_adapter[key], tensor, rtol=0.0, atol=1e-4), key
