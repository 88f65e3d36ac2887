"""Layer-streaming conversion: adapters and QFuRA checkpoints from safetensors shards, without loading the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fura
from fura.explicit.btt import configure_blocktt_trainability, convert_linear_to_btt
from fura.io.safetensors_stream import CheckpointReader, StreamingSafetensorsWriter, TensorSpec, read_header
from fura.io.streaming import (
    ADAPTER_WEIGHTS,
    QFURA_MANIFEST,
    StreamReport,
    convert_qfura,
    load_qfura,
    make_random_checkpoint,
    prepare_adapter,
)
from fura.tuner.factorize import ALL_PROJECTIONS

TINY = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=96)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matrices: intra-op threads only add OpenMP overhead on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llama checkpoints on disk, created lazily: ``checkpoints(dtype, **overrides)`` → folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(dtype=torch.float32, **overrides):
        key = (dtype, *sorted(overrides.items()))
        if key not in made:
            made[key] = make_random_checkpoint(root / f"ckpt{len(made)}", **{**TINY, "dtype": dtype, **overrides})
        return made[key]

    return get


def _load(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _inputs():
    return torch.randint(0, TINY["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))


def _adapter_config(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # a set: its order is arbitrary
    return config


def _forbid_decompositions(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a decomposition ran while loading a streamed adapter")

    for name in ("svd", "eigh", "qr"):
        monkeypatch.setattr(torch.linalg, name, forbidden)


# --------------------------------------------------------------------------------------------
# safetensors streaming I/O
# --------------------------------------------------------------------------------------------


def test_writer_streams_a_valid_file_in_any_order(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5, dtype=torch.bfloat16),
        "a.scale": torch.randn(7),
        "c.count": torch.tensor(3, dtype=torch.int64),
        "d.empty": torch.empty(0, 4),
    }
    path = tmp_path / "out.safetensors"
    specs = [TensorSpec.of(name, tensor) for name, tensor in tensors.items()]
    with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for name in reversed(tensors):
            writer.write(name, tensors[name])
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # data section 8-byte aligned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # the temp file was renamed


def test_writer_checks_specs_and_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "out.safetensors"
    specs = [TensorSpec("x", torch.float32, (2, 2)), TensorSpec("y", torch.float32, (3,))]
    with pytest.raises(ValueError, match="header says"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already written"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 2))
        writer.write("x", torch.zeros(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_reader_sees_the_same_tensors_in_one_file_and_in_shards(tmp_path):
    sharded = make_random_checkpoint(tmp_path / "sharded", **TINY, dtype=torch.float32)
    single = make_random_checkpoint(tmp_path / "single", **TINY, dtype=torch.float32, shard_per_layer=False)
    assert len(list(sharded.glob("model-*.safetensors"))) == TINY["layers"] + 1
    a, b = CheckpointReader(sharded), CheckpointReader(single)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a)
    key = "model.layers.1.mlp.down_proj.weight"
    assert b"".join(a.iter_bytes(key, chunk_bytes=100)) == a.get_tensor(key).numpy().tobytes()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CheckpointReader(tmp_path)


# --------------------------------------------------------------------------------------------
# FuRA adapters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_adapter_equals_in_memory_get_peft_model(dtype, checkpoints, tmp_path, monkeypatch):
    model_dir = checkpoints(dtype)
    report = prepare_adapter(model_dir, tmp_path / "streamed", fura.FuraConfig(), progress=False)
    assert report.modules == 7 * TINY["layers"] and report.layers == TINY["layers"]

    expected_model = get_peft_model(_load(model_dir, dtype), fura.FuraConfig())
    expected = get_peft_model_state_dict(expected_model)
    expected_model.save_pretrained(tmp_path / "in_memory")
    with safe_open(str(tmp_path / "streamed" / ADAPTER_WEIGHTS), "pt") as handle:
        assert set(handle.keys()) == set(expected)
    streamed_config, in_memory_config = (_adapter_config(tmp_path / name) for name in ("streamed", "in_memory"))
    assert streamed_config == in_memory_config
    assert streamed_config["weights_in_file"] is True and streamed_config["base_model_name_or_path"] == str(model_dir)

    base = _load(model_dir, dtype)
    inputs = _inputs()
    with torch.no_grad():
        reference = base(inputs).logits
    _forbid_decompositions(monkeypatch)
    loaded = PeftModel.from_pretrained(base, tmp_path / "streamed")
    state = get_peft_model_state_dict(loaded)
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, reference)


def test_streamed_adapter_other_options_tied_embeddings_single_file(checkpoints, tmp_path):
    model_dir = checkpoints(tie_word_embeddings=True, shard_per_layer=False)
    assert (model_dir / "model.safetensors").is_file()
    config = fura.FuraConfig(
        decomp_mode="input_one_block", rank=4, s_merged_to="split", target_modules=["q_proj", "down_proj"]
    )
    prepare_adapter(model_dir, tmp_path, config, progress=False)
    expected = get_peft_model_state_dict(get_peft_model(_load(model_dir), config))
    loaded = PeftModel.from_pretrained(_load(model_dir), tmp_path)
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert config.target_modules == {"q_proj", "down_proj"}  # the caller's config is not modified


def test_streamed_adapter_refuses_extra_saved_tensors(checkpoints, tmp_path):
    config = fura.FuraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        prepare_adapter(checkpoints(), tmp_path, config, progress=False)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()


# --------------------------------------------------------------------------------------------
# QFuRA
# --------------------------------------------------------------------------------------------


def _in_memory_qfura(model_dir, train_bias, layout):
    model = _load(model_dir)
    convert_linear_to_btt(
        model,
        "full",
        decomp_mode="output_one_block",
        include_names=ALL_PROJECTIONS,
        s_merged_to="keep_trainable",
        train_position="small",
        factorize_by_head=True,
        show_progress=False,
    )
    configure_blocktt_trainability(model, train_bias, "small", train_singular_values=True)
    fura.convert_btt_to_qbtt_(model, layout, "nf4", True, torch.float32)
    return model


@pytest.mark.parametrize(
    ("overrides", "train_bias", "layout"),
    [({"attention_bias": True}, False, "flat"), ({"tie_word_embeddings": True}, True, "per_core_block")],
)
def test_qfura_streaming_equals_in_memory_nf4(overrides, train_bias, layout, checkpoints, tmp_path):
    model_dir = checkpoints(**overrides)
    report = convert_qfura(
        model_dir, tmp_path, layout=layout, compute_dtype=torch.float32, train_bias=train_bias, progress=False
    )
    assert report.modules == 7 * TINY["layers"] and report.extra["nf4_bytes_saved"] > 0
    assert not (tmp_path / "model.safetensors.index.json").exists()  # not loadable as a plain model by mistake
    manifest = json.loads((tmp_path / QFURA_MANIFEST).read_text())
    assert manifest["settings"]["train_bias"] is train_bias and len(manifest["modules"]) == report.modules
    shards = sorted(tmp_path.glob("qfura-*.safetensors"))
    assert len(shards) == TINY["layers"] + 1
    index = json.loads((tmp_path / "qfura.safetensors.index.json").read_text())
    stored = {name: info for shard in shards for name, info in read_header(shard)[0].items()}
    assert index["weight_map"].keys() == stored.keys()
    assert index["metadata"]["total_size"] == sum(info.nbytes for info in stored.values())
    assert all(name.startswith("model.layers.0.") for name in read_header(shards[0])[0])

    loaded = load_qfura(tmp_path, dtype=torch.float32)
    expected = _in_memory_qfura(model_dir, train_bias, layout)
    assert not [name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), fura.QBlockTTLinear)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in expected.named_parameters() if p.requires_grad}
    assert any(name.endswith("btt_s") for name in trainable)
    assert any(name.endswith(".bias") for name in trainable) == (train_bias and "attention_bias" in overrides)
    inputs = _inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(inputs).logits, expected(inputs).logits, atol=1e-5, rtol=0)
    loaded(inputs, labels=inputs).loss.backward()  # trains: gradients reach the small cores
    assert all(p.grad is not None for name, p in loaded.named_parameters() if name.endswith("btt_r"))

    half = load_qfura(tmp_path, dtype=torch.bfloat16)
    assert half.get_submodule("model.layers.0.self_attn.q_proj").btt_r.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    blobs = {name: buf.dtype for name, buf in loaded.named_buffers() if "qbtt_frozen" in name}
    assert blobs == {name: buf.dtype for name, buf in half.named_buffers() if "qbtt_frozen" in name}


def test_load_qfura_needs_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_qfura"):
        load_qfura(tmp_path)


# --------------------------------------------------------------------------------------------
# Memory: peak RSS stays near one layer
# --------------------------------------------------------------------------------------------


def test_peak_memory_is_about_one_layer_not_the_model(tmp_path):
    """Peak RSS above the start of a call stays below 3 layers' bytes on a 4-layer checkpoint.

    Checkpoint: fp32, hidden 768, intermediate 2048, 4 layers (24 MiB of target weights per layer,
    96 MiB in all). What streaming must hold is one weight and its decomposition: the float64 working
    copies of the largest weight (2048×768, 12 MiB each; the adapter path needs about two, the
    explicit QFuRA path about four plus its BlockTT factors) — measured about 1 and 2.3 layers' bytes.
    Loading the model would need at least all 4 layers. Each call resets the kernel's peak counter and
    trims the heap before taking its baseline, so the measurement runs in this process (a fresh
    interpreter would spend longer importing peft than the test takes); a warm-up conversion of a tiny
    checkpoint first pays the one-off costs unrelated to model size (library code paged in on first
    use). The RSS after each layer must also stay flat: nothing from earlier layers is kept.
    """
    tiny = make_random_checkpoint(tmp_path / "warm", **{**TINY, "layers": 1}, dtype=torch.float32)
    prepare_adapter(tiny, tmp_path / "warm-adapter", fura.FuraConfig(), progress=False)
    convert_qfura(tiny, tmp_path / "warm-qfura", progress=False)
    model_dir = make_random_checkpoint(
        tmp_path / "ckpt", hidden=768, intermediate=2048, layers=4, heads=12, kv_heads=4, vocab=512, dtype=torch.float32
    )
    reports = {
        "fura": prepare_adapter(model_dir, tmp_path / "adapter", fura.FuraConfig(), progress=False),
        "qfura": convert_qfura(model_dir, tmp_path / "qfura", progress=False),
    }
    shutil.rmtree(model_dir)  # 100 MiB: do not leave it in pytest's kept temp folders
    layer = 768 * (768 * 2 + 256 * 2 + 2048 * 3) * 4
    for kind, report in reports.items():
        assert report.largest_layer_bytes == layer and report.bytes_read == 4 * layer
        if not report.peak_reset:
            pytest.skip("this kernel cannot reset the peak RSS counter (/proc/self/clear_refs)")
        assert report.peak_above_baseline_bytes < 3 * layer, (kind, report.summary())
        rss = report.layer_rss_bytes
        assert max(rss) - min(rss) < layer / 2, (kind, rss)


def test_report_extrapolates_time_linearly_and_memory_flat():
    report = StreamReport("fura_adapter", "m", "o", layers=4, wall_seconds=10.0, layer_seconds=[2.0] * 4)
    report.peak_rss_bytes, report.bytes_written, report.extra["layer_bytes_written"] = 5 << 30, 400, 100
    estimate = report.extrapolate(32)
    assert estimate["wall_seconds"] == pytest.approx(2.0 + 32 * 2.0)
    assert estimate["peak_rss_bytes"] == 5 << 30 and estimate["bytes_written"] == 400 + 28 * 100


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_fura_stream_command_writes_a_loadable_adapter_and_a_report(tmp_path):
    import fura_cli.commands as cli

    model_dir = tmp_path / "model"
    args = ["--hidden", "64", "--intermediate", "96", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
    assert cli.main(["stream", "make-checkpoint", str(model_dir), *args, "--vocab", "96", "--dtype", "float32"]) == 0
    assert (
        cli.main(
            [
                "stream",
                "prepare",
                str(model_dir),
                str(tmp_path / "adapter"),
                "--report",
                str(tmp_path / "r.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["modules"] == 14 and len(report["layer_seconds"]) == 2

    base = _load(model_dir)
    with torch.no_grad():
        reference = base(_inputs()).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.equal(loaded(_inputs()).logits, reference)  # exact init, read back from the streamed file


def test_fura_stream_help_lists_the_steps(capsys):
    import fura_cli.commands as cli

    with pytest.raises(SystemExit):
        cli.main(["stream", "--help"])
    text = capsys.readouterr().out
    assert all(step in text for step in ("make-checkpoint", "prepare", "qfura"))


def test_fura_stream_never_writes_into_a_users_folder_or_its_input(tmp_path, capsys):
    import fura_cli.commands as cli

    model_dir = tmp_path / "model"
    sizes = ["--hidden", "64", "--intermediate", "96", "--layers", "1", "--heads", "4", "--kv-heads", "2"]
    assert cli.main(["stream", "make-checkpoint", str(model_dir), *sizes, "--vocab", "96", "--dtype", "float32"]) == 0
    model_files = sorted(p.name for p in model_dir.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for output, force in ((mine, []), (model_dir, ["--force"]), (tmp_path, ["--force"])):
        status = cli.main(["stream", "prepare", str(model_dir), str(output), "--no-progress", *force])
        err = capsys.readouterr().err
        assert status == cli.EXIT_USAGE and ("--force" in err or "which this command reads" in err), err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in model_dir.iterdir()) == model_files
    assert cli.main(["stream", "prepare", str(model_dir), str(mine), "--no-progress", "--force"]) == 0
    assert (mine / "adapter_model.safetensors").exists() and not (mine / "notes.txt").exists()
