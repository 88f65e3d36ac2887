"""``fura train vlm`` on a tiny random LLaVA, fully offline: what trains, the projector's learning rate, the run
folder, reloading the adapter + projector, and resuming a killed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, TrainerCallback

import fura_cli.commands as cli
from fura.recipes import vlm
from fura.recipes.data.llava import LlavaCollator, LlavaDataConfig, LlavaEncoder

from .data.test_llava import ROWS, build_processor, save_tiny_llava, tiny_llava, write_llava_data
from .test_runs import PNG_MAGIC

STEPS, SAVE_EVERY = 3, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and 2 threads on a busy 2-core machine crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(TrainerCallback):
    """Keeps the trainer's model state and optimizer groups at the start, and the group learning rates per step."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.groups: list[dict] = []
        self.lrs: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.groups = [
            {"name": g["name"], "lr": g.get("initial_lr", g["lr"]), "params": list(g["params"])}
            for g in optimizer.param_groups
        ]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA folder (model + processor), a LLaVA JSON and its image folder."""
    root = tmp_path_factory.mktemp("vlm")
    data, images = write_llava_data(root)
    return {"root": root, "model": save_tiny_llava(root / "model"), "data": data, "images": images}


def cli_args(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "-q", "train", "vlm", "--model", str(env["model"]), "--method", "fura", "--dtype", "float32",
        "--data", str(env["data"]), "--image-folder", str(env["images"]), "--max-seq-len", "512",
        "--batch-size", "2", "--grad-accum", "1", "--max-steps", str(STEPS), "--save-steps", str(SAVE_EVERY),
        "--logging-steps", "1", "--no-gradient-checkpointing", "--mixed-precision", "no", "--num-workers", "0",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fura_run(env) -> dict:
    """``fura train vlm --method fura`` for 3 steps through the CLI, with a recorder slipped into the trainer."""
    recorder, trainers = Recorder(), []
    original = vlm.build_trainer

    def build_trainer(*args, callbacks=(), **kwargs):
        trainers.append(original(*args, callbacks=[*callbacks, recorder], **kwargs))
        return trainers[-1]

    out = env["root"] / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(vlm, "build_trainer", build_trainer)
            assert cli.main(cli_args(env, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "recorder": recorder, "model": trainers[0].model.eval()}


def batch_of(processor, env, rows) -> dict[str, torch.Tensor]:
    config = LlavaDataConfig(train_files=[str(env["data"])], image_folder=str(env["images"]))
    encoder = LlavaEncoder(processor, config, env["images"])
    batch = LlavaCollator.for_tokenizer(processor.tokenizer)([encoder(r) for r in rows])
    batch.pop("labels")
    return batch


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ----------------------------------------------------------------------------------------------------------------
# Training through the CLI
# ----------------------------------------------------------------------------------------------------------------


def test_cli_run_writes_the_run_folder(fura_run) -> None:
    out = fura_run["out"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "fura" and config["track"] == "vlm"
    assert config["training"]["learning_rate"] == 2e-4 and config["training"]["mm_projector_lr"] == 2e-5
    assert list(train_losses(out)) == [1, 2, 3] and all(v > 0 for v in train_losses(out).values())
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == STEPS

    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "FURA" and adapter_config["factorize_by_head"] is False
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all("fura_" in k or "multi_modal_projector" in k for k in weights)
    assert all("language_model" in k for k in weights if "fura_" in k)
    assert {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"} == set(
        load_file(out / "adapter" / vlm.PROJECTOR_FILE)
    )
    assert (out / "adapter" / "processor_config.json").is_file()
    method = json.loads((out / "method.json").read_text())
    assert method["vlm"]["adapted_modules"] == 14 and method["vlm"]["projector_params"] == 2112


def _base_key(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def test_only_adapter_and_projector_change(fura_run, env) -> None:
    final = fura_run["model"].state_dict()
    initial = fura_run["recorder"].initial
    trained = {k for k in final if "fura_" in k or ".modules_to_save." in k}
    changed = {k for k in final if not torch.equal(final[k], initial[k])}
    assert changed <= trained
    assert any("fura_" in k for k in changed)
    projector = {k for k in trained if "multi_modal_projector" in k}
    assert projector and projector <= changed  # every projector tensor moved

    original = LlavaForConditionalGeneration.from_pretrained(env["model"], dtype=torch.float32).state_dict()
    frozen = {_base_key(k): v for k, v in final.items() if k not in trained}
    assert set(frozen) == set(original)  # the vision tower, the LM base weights, embeddings, norms, lm_head, ...
    for key, value in original.items():
        assert torch.equal(frozen[key], value), f"{key} changed"
    assert any("vision_tower" in k for k in original)


def test_projector_group_uses_mm_projector_lr(fura_run) -> None:
    recorder, model = fura_run["recorder"], fura_run["model"]
    by_name = {g["name"]: g for g in recorder.groups}
    projector_params = {id(p) for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" in n}
    in_projector_groups = {id(p) for name, g in by_name.items() if name.startswith("projector") for p in g["params"]}
    assert in_projector_groups == projector_params and len(projector_params) == 4
    for name, group in by_name.items():
        assert group["lr"] == (2e-5 if name.startswith("projector") else 2e-4), name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in recorder.groups for p in g["params"]) == trainable
    for step in recorder.lrs:  # the schedule scales both groups alike
        if step["language_model"] > 0:
            assert step["projector"] / step["language_model"] == pytest.approx(0.1)


def test_adapter_reload_reproduces_logits(fura_run, env) -> None:
    from peft import PeftModel

    processor = build_processor()
    batch = batch_of(processor, env, [ROWS[0], ROWS[1], ROWS[2]])
    with torch.no_grad():
        expected = fura_run["model"](**batch).logits
        base = LlavaForConditionalGeneration.from_pretrained(env["model"], dtype=torch.float32)
        base_logits = base(**batch).logits
        reloaded = PeftModel.from_pretrained(base, fura_run["out"] / "adapter").eval()
        logits = reloaded(**batch).logits
    assert (logits - expected).abs().max() < 1e-5
    assert (base_logits - expected).abs().max() > 1e-4  # the adapter is not a no-op
    with torch.no_grad():
        merged = vlm.merge_vlm(vlm.load_vlm(fura_run["out"], dtype="float32")[0])
        assert (merged(**batch).logits - expected).abs().max() < 1e-4  # dense model, projector included
    assert isinstance(merged, LlavaForConditionalGeneration)
    parts = vlm.locate_parts(reloaded.get_base_model())
    saved = load_file(fura_run["out"] / "adapter" / vlm.PROJECTOR_FILE)
    for key, value in vlm.projector_state(reloaded, parts).items():
        assert torch.equal(saved[key], value)


def test_resume_continues_at_the_right_step(fura_run, tmp_path) -> None:
    killed = tmp_path / "killed"  # what a kill after step 3's log line (before its checkpoint) leaves behind
    shutil.copytree(fura_run["out"], killed)
    for leftover in ("checkpoints/checkpoint-3", "adapter"):
        shutil.rmtree(killed / leftover)
    (killed / "results.json").unlink()
    config = yaml.safe_load((killed / "config.yaml").read_text())
    config["output_dir"] = str(killed)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    assert cli.main(["-q", "train", "vlm", "--config", str(tmp_path / "run.yaml"), "--resume"]) == 0
    assert train_losses(killed) == pytest.approx(train_losses(fura_run["out"]), abs=1e-5)
    assert "resuming from checkpoint-2" in (killed / "train.log").read_text()
    state = json.loads((killed / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS and [r["step"] for r in state["log_history"] if "loss" in r] == [1, 2, 3]
    straight = load_file(fura_run["out"] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert set(straight) == set(resumed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


def test_full_method_saves_a_dense_model_that_reloads(env, tmp_path) -> None:
    out = tmp_path / "full"
    argv = cli_args(env, out, "--method", "full", "--max-steps", "1", "--warmup-ratio", "0", "--save-steps", "100")
    assert cli.main(argv) == 0
    model, processor = vlm.load_vlm(out, dtype="float32")  # the run folder's model/ and its processor
    base = LlavaForConditionalGeneration.from_pretrained(env["model"], dtype=torch.float32)
    trained, original = model.state_dict(), base.state_dict()
    changed = {k for k in original if not torch.equal(trained[k], original[k])}
    assert changed and not any("vision_tower" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    projector = load_file(out / "model" / vlm.PROJECTOR_FILE)
    assert all(torch.equal(v, trained[f"model.multi_modal_projector.{k}"]) for k, v in projector.items())
    batch = batch_of(processor, env, [ROWS[0]])
    with torch.no_grad():
        assert (model(**batch).logits - base(**batch).logits).abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# Methods and configuration (no training)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "adapted"), [("fura", 14), ("lora", 10), ("dora", 14), ("full", 0)])
def test_methods_adapt_only_the_language_model(method, adapted) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, info, _ = vlm.apply_vlm_method(tiny_llava(build_processor()), method, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(names) == adapted and all(".language_model." in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert info.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "full":
        assert {n for n, _ in model.named_parameters() if "vision_tower" not in n} == trainable  # lm_head too
    if method == "dora":
        assert model.peft_config["default"].use_dora and model.peft_config["default"].r == 128


def test_target_names_shared_with_clip_stay_in_the_language_model() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    args = {"target_modules": ["q_proj", "v_proj"]}  # CLIP's attention has q_proj / v_proj too
    model, _, _ = vlm.apply_vlm_method(tiny_llava(build_processor()), "lora", method_args=args)
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(names) == 4 and all(".language_model." in n for n in names)
    with pytest.raises(RuntimeError, match="outside the language model"):
        vlm.apply_vlm_method(tiny_llava(build_processor()), "lora", method_args={"target_modules": r".*\.q_proj"})


def test_print_config_and_unsupported_methods(env, capsys) -> None:
    argv = ["train", "vlm", "--model", str(env["model"]), "--data", "a.json", "--print-config"]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    training = printed["training"]
    assert training["learning_rate"] == 2e-4 and training["mm_projector_lr"] == 2e-5
    assert training["gradient_checkpointing"] is True and training["adam_beta2"] == 0.999
    assert training["lr_scheduler_type"] == "cosine" and printed["data"]["template"] == "vicuna_v1"
    assert cli.main([*argv[:-1], "--method", "qlora"]) == cli.EXIT_USAGE
    assert "not supported for VLM" in capsys.readouterr().err


def test_projector_trains_in_float32_over_a_bf16_base(env) -> None:
    processor = build_processor()
    model, _, parts = vlm.apply_vlm_method(tiny_llava(processor).to(torch.bfloat16), "fura")
    assert all(p.dtype == torch.float32 for p in vlm.projector_module(model, parts).parameters())
    batch = batch_of(processor, env, [ROWS[0], ROWS[1]])
    batch["labels"] = batch["input_ids"].clone()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in vlm.projector_module(model, parts).parameters()]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)
