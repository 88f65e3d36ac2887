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
from fura.recipes.args import RecipeArgumentError, dump_yaml
from fura.recipes.data.llava import LlavaCollator, LlavaDataConfig, LlavaEncoder
from fura.recipes.registry import get_method
from fura.recipes.runs import RunFolder, RunFolderError

from .data.test_llava import ROWS, build_processor, save_tiny_llava, tiny_llava, write_llava_data
from .test_runs import PNG_MAGIC, fake_checkpoint

STEPS, SAVE_EVERY = 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")


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
        "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-steps", str(STEPS),
        "--save-steps", str(SAVE_EVERY), "--logging-steps", "1", "--activation-checkpointing", "false",
        "--bf16", "false", "--dataloader-num-workers", "0",
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
    assert config["learning_rate"] == 2e-4 and config["mm_projector_lr"] == 2e-5  # the method's vlm values
    assert config["activation_checkpointing"] is False and config["max_seq_len"] == 512  # from the flags
    assert vlm.parse_settings(["--config", str(out / "config.yaml")]).to_dict() == config  # a valid --config file
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


@pytest.mark.parametrize("method", ["fura", "lora"])
def test_merge_gives_a_plain_llava_with_the_trained_projector(env, method) -> None:
    model, _, parts = vlm.apply_vlm_method(tiny_llava(build_processor()), method)
    with torch.no_grad():
        for param in vlm.projector_module(model, parts).parameters():
            param.add_(0.5)  # the projector "trained": the merged model must carry this copy, not the original
    trained = vlm.projector_state(model, parts)
    merged = vlm.merge_vlm(model)
    assert isinstance(merged, LlavaForConditionalGeneration)
    projector = merged.get_submodule(parts.projector)
    assert not hasattr(projector, "modules_to_save")
    assert all(torch.equal(projector.state_dict()[k].cpu(), v) for k, v in trained.items())


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
    argv = cli_args(env, out, "--method", "full", "--max-steps", "1", "--warmup-steps", "0", "--save-steps", "100")
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
    assert printed["learning_rate"] == 2e-4 and printed["mm_projector_lr"] == 2e-5 and printed["track"] == "vlm"
    assert printed["activation_checkpointing"] is True and printed["adam_beta2"] == 0.999
    assert printed["lr_scheduler_type"] == "cosine" and printed["template"] == "vicuna_v1"
    assert printed["output_dir"] == str(Path("runs") / "model-vlm-fura")
    assert cli.main([*argv[:-1], "--method", "qlora"]) == cli.EXIT_USAGE
    assert "not supported for VLM. Fix: --method one of fura, lora, dora, full" in capsys.readouterr().err
    assert cli.main(["train", "vlm", "--data", "a.json"]) == cli.EXIT_USAGE
    assert "no model: set --model" in capsys.readouterr().err


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


def test_resume_of_a_finished_run_is_a_no_op(fura_run, env, tmp_path, capsys, monkeypatch) -> None:
    finished = tmp_path / "finished"
    shutil.copytree(fura_run["out"], finished)
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}

    def no_model(*args, **kwargs):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(vlm, "load_llava", no_model)
    assert cli.main(cli_args(env, finished, "--resume")) == 0
    assert f"{finished} holds a finished run ({STEPS} steps): nothing to resume" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_bad_data_or_flag_fails_before_the_run_folder_or_the_model(env, tmp_path, capsys, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(vlm, "load_llava", no_model)
    monkeypatch.setattr(vlm, "load_processor", no_model)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "run"
    assert cli.main([*cli_args(env, out), "--data", str(empty)]) == cli.EXIT_USAGE
    assert "empty.json'] holds no rows. Fix: point --data at LLaVA files with rows" in capsys.readouterr().err
    assert cli.main([*cli_args(env, out), "--max-seq-len", "0"]) == cli.EXIT_USAGE
    assert "max_seq_len must be positive" in capsys.readouterr().err
    assert cli.main([*cli_args(env, out), "--eval-steps", "1"]) == cli.EXIT_USAGE  # no held-out rows
    assert "eval_steps needs held-out rows. Fix: set --val_set_size > 0" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_a_changed_model_or_data(env, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["--model", str(env["model"]), "--data", str(env["data"]), "--image-folder", str(env["images"]),
            "--output-dir", str(out)]  # fmt: skip
    run = RunFolder(out)
    run.prepare()
    run.write_config(dump_yaml(vlm.resolve_settings(vlm.parse_settings(argv)).to_dict()))
    fake_checkpoint(out, SAVE_EVERY)
    changed = vlm.parse_settings([*argv, "--template", "chat", "--max-rows", "2", "--seed", "1", "--resume"])
    with pytest.raises(RunFolderError, match=r"max_rows, seed, template differ"):
        vlm.run_vlm(changed)


# ----------------------------------------------------------------------------------------------------------------
# Settings: YAML and flags (no training)
# ----------------------------------------------------------------------------------------------------------------

BASE = ["--model", "llava", "--data", "a.json"]


def test_flags_override_yaml_which_overrides_defaults_and_the_method(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: llava\ntrain_files: a.json\ntemplate: chat\nmm_projector_lr: 1e-5\nlearning_rate: 1e-3\nmax_rows: 3\n"
    )  # YAML reads 1e-5 as a string: converted like the flag; one file becomes a list
    settings = vlm.parse_settings(["--config", str(path), "--mm-projector-lr", "3e-5", "--max_rows", "5"])
    assert settings.training.mm_projector_lr == 3e-5 and settings.data.max_rows == 5  # flags beat the YAML
    assert settings.data.template == "chat" and settings.data.train_files == ["a.json"]  # YAML
    assert settings.training.learning_rate == 1e-3 and settings.data.image_aspect_ratio == "pad"  # YAML, default
    assert {"mm_projector_lr", "max_rows", "template", "learning_rate"} <= settings.explicit
    assert not {"track", "image_aspect_ratio", "seed"} & settings.explicit

    # the method's vlm values fill only what the user left unset
    monkeypatch.setitem(get_method("fura").defaults("vlm").training, "mm_projector_lr", 7e-6)
    monkeypatch.setitem(get_method("fura").defaults("vlm").training, "learning_rate", 3e-4)
    resolved = vlm.resolve_settings(settings)
    assert (resolved.training.mm_projector_lr, resolved.training.learning_rate) == (3e-5, 1e-3)
    resolved = vlm.resolve_settings(vlm.parse_settings(["--config", str(path)]))
    assert (resolved.training.mm_projector_lr, resolved.training.learning_rate) == (1e-5, 1e-3)
    resolved = vlm.resolve_settings(vlm.parse_settings(BASE))
    assert (resolved.training.mm_projector_lr, resolved.training.learning_rate) == (7e-6, 3e-4)


#: The flags ``fura train vlm`` documents, with the setting each one sets.
FLAGS = [
    (["--model", "m"], "run.model", "m"),
    (["--method", "dora"], "run.method", "dora"),
    (["--track", "commonsense"], "run.track", "commonsense"),
    (["--method-arg", "r=4", "--method-arg", "lora_alpha=8"], "run.method_arg", ["r=4", "lora_alpha=8"]),
    (["--dtype", "bfloat16"], "run.dtype", "bfloat16"),
    (["--output-dir", "runs/x"], "training.output_dir", "runs/x"),
    (["--resume"], "run.resume", True),
    (["--overwrite"], "run.overwrite", True),
    (["--trust-remote-code"], "run.trust_remote_code", True),
    (["--print-config"], "run.print_config", True),
    (["--data", "b.json", "c.jsonl"], "data.train_files", ["b.json", "c.jsonl"]),
    (["--image-folder", "imgs"], "data.image_folder", "imgs"),
    (["--template", "chat"], "data.template", "chat"),
    (["--system-prompt", ""], "data.system_prompt", ""),
    (["--max-seq-len", "64"], "data.max_seq_len", 64),
    (["--image-aspect-ratio", "crop"], "data.image_aspect_ratio", "crop"),
    (["--val-set-size", "2"], "data.val_set_size", 2),
    (["--max-rows", "9"], "data.max_rows", 9),
    (["--no-check-images"], "data.check_images", False),
    (["--check-images"], "data.check_images", True),
    (["--learning-rate", "1e-4"], "training.learning_rate", 1e-4),
    (["--mm-projector-lr", "4e-5"], "training.mm_projector_lr", 4e-5),
    (["--num-train-epochs", "2.5"], "training.num_train_epochs", 2.5),
    (["--max-steps", "7"], "training.max_steps", 7),
    (["--per-device-train-batch-size", "3"], "training.per_device_train_batch_size", 3),
    (["--gradient-accumulation-steps", "5"], "training.gradient_accumulation_steps", 5),
    (["--warmup-steps", "0.1"], "training.warmup_steps", 0.1),
    (["--lr-scheduler-type", "linear"], "training.lr_scheduler_type", "linear"),
    (["--weight-decay", "0.01"], "training.weight_decay", 0.01),
    (["--max-grad-norm", "0"], "training.max_grad_norm", 0.0),
    (["--optim", "sgd"], "training.optim", "sgd"),
    (["--activation-checkpointing"], "training.activation_checkpointing", True),
    (["--activation-checkpointing", "false"], "training.activation_checkpointing", False),
    (["--bf16", "true", "--use_cpu", "true"], "training.bf16", True),  # bf16 on CPU needs use_cpu
    (["--fp16=true"], "training.fp16", True),
    (["--bf16", "false"], "training.bf16", False),
    (["--seed", "5"], "training.seed", 5),
    (["--logging-steps", "4"], "training.logging_steps", 4),
    (["--save-steps", "6"], "training.save_steps", 6),
    (["--save-total-limit", "1"], "training.save_total_limit", 1),
    (["--val-set-size", "2", "--eval-steps", "3"], "training.eval_steps", 3),
    (["--dataloader-num-workers", "0"], "training.dataloader_num_workers", 0),
]


@pytest.mark.parametrize(("flags", "setting", "expected"), FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_each_flag_sets_its_setting(flags, setting, expected) -> None:
    settings = vlm.parse_settings([*BASE, *flags])
    if "--print-config" not in flags and "--resume" not in flags:
        settings = vlm.resolve_settings(settings)  # what the run uses (the checkpointing flags have two names)
    section, name = setting.split(".")
    value = getattr(getattr(settings, section), name)
    assert (value.value if hasattr(value, "value") else value) == expected
    assert name in settings.explicit or section == "training"  # output_dir / mixed precision: set in resolution


def test_print_config_is_a_config_file_that_reproduces_the_settings(env, tmp_path, capsys) -> None:
    argv = ["train", "vlm", *BASE, "--mm-projector-lr", "3e-5", "--template", "chat", "--method-arg", "r=3",
            "--activation-checkpointing", "false", "--lr-scheduler-type", "linear",
            "--output-dir", str(tmp_path / "run"), "--print-config"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = vlm.resolve_settings(vlm.parse_settings(["--config", str(path)]))
    assert dump_yaml(again.to_dict()) == printed
    values = yaml.safe_load(printed)
    assert (values["mm_projector_lr"], values["template"], values["method_arg"]) == (3e-5, "chat", ["r=3"])
    assert (values["activation_checkpointing"], values["lr_scheduler_type"]) == (False, "linear")
    assert not {"resume", "overwrite", "print_config"} & set(values)  # switches of one invocation, not settings


def test_yaml_false_for_a_setting_that_defaults_to_true(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: llava\ntrain_files: [a.json]\ncheck_images: false\n")
    assert vlm.parse_settings(["--config", str(path)]).data.check_images is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mm-projector-l", "1"], r"unknown flag --mm-projector-l \(did you mean --mm-projector-lr\?\)"),
        (["--learning-rat", "1"], r"unknown flag --learning-rat \(did you mean --learning-rate\?\)"),
        (["--image-folders", "x"], r"unknown flag --image-folders \(did you mean --image-folder\?\)"),
        (["--template", "llama"], r"invalid choice: 'llama'"),
    ],
)
def test_unknown_or_bad_flags_are_one_line_errors(argv, message, capsys) -> None:
    with pytest.raises(RecipeArgumentError, match=message):
        vlm.parse_settings([*BASE, *argv])
    assert cli.main(["train", "vlm", *BASE, *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fura: error: fura train vlm: ")


def test_unknown_yaml_settings_name_the_file_and_the_closest_field(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: llava\nmm_projector_learning_rate: 1e-5\n")
    expected = r"run.yaml: unknown setting 'mm_projector_learning_rate' \(did you mean mm_projector_lr\?\)"
    with pytest.raises(RecipeArgumentError, match=expected):
        vlm.parse_settings(["--config", str(path)])
