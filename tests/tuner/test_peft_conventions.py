"""FuRA follows PEFT's conventions: one test per gap found when a PEFT user swaps LoraConfig for FuraConfig.

1. ``init_weights=False`` is a random, non-identity adapter; "weights come from a file" is ``weights_in_file``.
2. ``autocast_adapter_dtype`` is honoured both ways.
3. Mixed-adapter batches (``adapter_names``) in forward and generate.
4. A failing ``get_peft_model`` / ``add_adapter`` leaves the model exactly as it was.
5. Loading refuses files with missing or extra FuRA tensors; the other-base check holds on every shape.
6. transformers' adapter API works with the versions the dependency bounds resolve to.
7. transformers' ``Conv1D`` (GPT-2 family) is supported, with default targets.
8. Config values are validated (booleans, ranks, per-module keys); badly factorable layers warn.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import fura
from fura.tuner.layer import BASE_APPROXIMATE_RTOL, BASE_MISMATCH_RTOL, FuraLayer
from fura.tuner.model import FuraAdapterFileError

from ..conftest import tiny_llama_config


def _base(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def _fura_layers(model: nn.Module) -> list[FuraLayer]:
    return [module for module in model.modules() if isinstance(module, FuraLayer)]


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def _saved_adapter(tmp_path, config: fura.FuraConfig, seed: int = 0, name: str = "adapter"):
    """A random (init_weights=False) adapter saved under ``tmp_path/name``; returns (folder, its base weights)."""
    base = _base()
    weights = copy.deepcopy(base.state_dict())
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, weights


# ------------------------------------------------------------------ 1. init_weights and weights_in_file


def test_init_weights_false_is_a_random_non_identity_adapter(tiny_inputs):
    reference = _logits(_base(), tiny_inputs)
    torch.manual_seed(3)
    model = get_peft_model(_base(), fura.FuraConfig(init_weights=False)).eval()
    adapted = _logits(model, tiny_inputs)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    torch.manual_seed(3)
    again = get_peft_model(_base(), fura.FuraConfig(init_weights=False)).eval()
    assert torch.equal(_logits(again, tiny_inputs), adapted)  # seeded: reproducible
    identity = get_peft_model(_base(), fura.FuraConfig()).eval()
    for layer, exact in zip(_fura_layers(model), _fura_layers(identity), strict=True):
        # the frozen decomposition is the real one; only the trainable tensors moved
        assert torch.equal(layer.fura_basis["default"].basis, exact.fura_basis["default"].basis)
        assert not torch.equal(layer.fura_core["default"].weight, exact.fura_core["default"].weight)


def test_loading_never_decomposes_even_in_float32(tmp_path, tiny_inputs, monkeypatch):
    folder, weights = _saved_adapter(tmp_path, fura.FuraConfig(init_weights=False))
    assert json.loads((folder / "adapter_config.json").read_text())["weights_in_file"] is True
    base = _base(5)
    base.load_state_dict(weights)
    expected = _logits(PeftModel.from_pretrained(copy.deepcopy(base), folder), tiny_inputs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a decomposition ran while loading an adapter")

    # float32 blocks are decomposed with a float64 Gram matrix + eigh, so eigh must be covered too
    for name in ("svd", "qr", "eigh"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr("fura.tuner.layer.decompose_blocks", forbidden)
    again = copy.deepcopy(base)
    loaded = PeftModel.from_pretrained(base, folder)
    assert torch.equal(_logits(loaded, tiny_inputs), expected)
    again.load_adapter(str(folder))  # transformers' adapter integration takes another path into PEFT
    assert torch.equal(_logits(again, tiny_inputs), expected)


def test_rank_one_core_is_not_a_view_of_the_frozen_basis(tiny_inputs):
    model = get_peft_model(_base(), fura.FuraConfig(rank=1))
    layer = _fura_layers(model)[0]
    basis = layer.fura_basis["default"].basis.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(tiny_inputs, labels=tiny_inputs).loss.backward()
    optimizer.step()
    assert torch.equal(layer.fura_basis["default"].basis, basis)


# ------------------------------------------------------------------ 2. autocast_adapter_dtype


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_is_honoured_both_ways(autocast, tiny_inputs, tmp_path):
    base = _base(dtype=torch.bfloat16)
    reference = _logits(base, tiny_inputs)
    model = get_peft_model(base, fura.FuraConfig(), autocast_adapter_dtype=autocast).eval()
    expected = torch.float32 if autocast else torch.bfloat16
    dtypes = {p.dtype for n, p in model.named_parameters() if "fura_" in n}
    assert dtypes == {expected}
    assert torch.equal(_logits(model, tiny_inputs), reference)  # still exactly the base at init
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if "fura_" in n} == {expected}


# ------------------------------------------------------------------ 3. mixed-adapter batches


def _two_adapter_model() -> PeftModel:
    torch.manual_seed(11)
    model = get_peft_model(_base(), fura.FuraConfig(init_weights=False), adapter_name="a")
    model.add_adapter("b", fura.FuraConfig(init_weights=False, decomp_mode="input_one_block"))
    return model.eval()


def _per_adapter(model: PeftModel, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {}
    with model.disable_adapter():
        outputs["__base__"] = _logits(model, inputs)
    for name in ("a", "b"):
        model.set_adapter(name)
        outputs[name] = _logits(model, inputs)
    return outputs


def test_mixed_batch_forward_equals_each_row_with_its_own_adapter():
    model = _two_adapter_model()
    torch.manual_seed(2)
    inputs = torch.randint(0, 96, (5, 10))
    names = ["a", "__base__", "b", "b", "a"]
    mixed = model(inputs, adapter_names=names).logits
    separate = _per_adapter(model, inputs)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], separate[name][row], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(separate["a"], separate["b"], atol=1e-3)  # the test can tell adapters apart
    with pytest.raises(ValueError, match="unknown adapter"):
        model(inputs, adapter_names=["a", "c", "b", "b", "a"])


def test_mixed_batch_generate_equals_generating_each_row_alone():
    model = _two_adapter_model()
    torch.manual_seed(4)
    prompts = torch.randint(3, 96, (3, 6))
    names = ["b", "a", "__base__"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=prompts, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=prompts[row : row + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=prompts[row : row + 1], **kwargs)
        assert torch.equal(mixed[row], alone[0])


# ------------------------------------------------------------------ 4. atomic injection


def _state(model: nn.Module) -> tuple[list[str], dict[str, bool]]:
    return (
        [f"{name}:{type(module).__name__}" for name, module in model.named_modules()],
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def test_failing_get_peft_model_leaves_the_base_model_as_it_was(tiny_inputs):
    base = _base()
    before, reference = _state(base), _logits(base, tiny_inputs)
    # valid for every projection but down_proj (in = 96), which comes last in each layer
    config = fura.FuraConfig(input_factorization={"down_proj": "7,8"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*7·8 = 56.*in_features|input_features"):
        get_peft_model(base, config)
    assert _state(base) == before
    assert not _fura_layers(base)
    assert torch.equal(_logits(base, tiny_inputs), reference)


def test_failing_add_adapter_leaves_the_existing_adapter_as_it_was(tiny_inputs):
    torch.manual_seed(0)
    model = get_peft_model(_base(), fura.FuraConfig(init_weights=False)).eval()
    before, reference = _state(model), _logits(model, tiny_inputs)
    with pytest.raises(ValueError, match="down_proj"):
        model.add_adapter("broken", fura.FuraConfig(input_factorization={"down_proj": "7,8"}))
    assert "broken" not in model.peft_config
    assert all("broken" not in layer.fura_core for layer in _fura_layers(model))
    assert _state(model) == before
    assert torch.equal(_logits(model, tiny_inputs), reference)


# ------------------------------------------------------------------ 5. loading checks


def _tamper(folder, drop: str | None = None, add: str | None = None) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    if drop:
        key = next(k for k in tensors if drop in k)
        del tensors[key]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("drop", "add", "message"),
    [
        ("fura_core.weight", None, r"missing 1 tensor\(s\), e\.g\. base_model\.model\..*_proj\.fura_core\.default"),
        ("fura_basis.sigma", None, r"missing 1 tensor\(s\), e\.g\. .*_proj\.fura_basis\.default\.sigma"),
        (None, "base_model.model.lm_head.fura_core.weight", r"1 tensor\(s\) this model has no place for: .*lm_head"),
    ],
)
def test_files_with_missing_or_extra_fura_tensors_are_refused(tmp_path, tiny_inputs, drop, add, message):
    folder, weights = _saved_adapter(tmp_path, fura.FuraConfig(init_weights=False))
    _tamper(folder, drop, add)
    base = _base(5)
    base.load_state_dict(weights)
    before = _state(base)
    with pytest.raises(FuraAdapterFileError, match=message):
        PeftModel.from_pretrained(base, folder)
    assert _state(base) == before  # the user's base model is left as it was
    # loading it as a second adapter: refused, and the model keeps only its first adapter
    torch.manual_seed(0)
    model = get_peft_model(base, fura.FuraConfig(init_weights=False)).eval()
    reference = _logits(model, tiny_inputs)
    with pytest.raises(FuraAdapterFileError, match="Nothing was loaded"):
        model.load_adapter(str(folder), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert all(set(layer.fura_core) == {"default"} for layer in _fura_layers(model))
    assert torch.equal(_logits(model, tiny_inputs), reference)


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.to(torch.int32), r"fura_core\.default\.weight is int32, not a floating-point tensor"),
        (_poisoned, r"fura_core\.default\.weight holds non-finite values"),
        (lambda t: torch.zeros(*t.shape[:-1], t.shape[-1] + 1), r"fura_core\.default\.weight has shape .* needs"),
    ],
    ids=["int32", "nan", "shape"],
)
def test_files_with_integer_non_finite_or_misshapen_fura_tensors_are_refused(tmp_path, change, message):
    """An int32 core would load truncated (an adapter equal to the base, the base check passing on 0/0); a NaN one
    would make every output NaN; a misshapen one would fail inside torch's loader."""
    folder, weights = _saved_adapter(tmp_path, fura.FuraConfig(init_weights=False))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if "fura_core.weight" in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    base = _base(5)
    base.load_state_dict(weights)
    before = _state(base)
    with pytest.raises(FuraAdapterFileError, match=message):
        PeftModel.from_pretrained(base, folder)
    assert _state(base) == before


def _mismatch(weight: torch.Tensor, adapter_weight: torch.Tensor) -> float:
    """The base check's statistic for an adapter made on ``adapter_weight`` and loaded onto ``weight``."""
    out_features, in_features = weight.shape
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    model[0].weight.data.copy_(adapter_weight)
    layer = _fura_layers(get_peft_model(model, fura.FuraConfig(target_modules=["0"])))[0]
    layer.get_base_layer().weight.data.copy_(weight)
    return layer.base_mismatch("default")


@pytest.mark.parametrize(("out_features", "in_features"), [(8192, 64), (64, 8192), (512, 512), (1536, 576)])
def test_other_base_check_has_a_margin_on_tall_wide_and_square_layers(out_features, in_features):
    """Same base (also after bf16 rounding / NF4 quantisation) is far below the refusal threshold, a foreign one far
    above — the measurement behind BASE_MISMATCH_RTOL (the old 5 % rule accepted the foreign tall layer)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    foreign = torch.randn(out_features, in_features) * 0.02
    quantized, state = functional.quantize_4bit(weight.contiguous(), quant_type="nf4")
    nf4 = functional.dequantize_4bit(quantized, state).float()
    assert _mismatch(weight, weight) < 1e-6
    assert _mismatch(weight.bfloat16().float(), weight) < BASE_APPROXIMATE_RTOL / 10
    assert _mismatch(nf4, weight) < BASE_MISMATCH_RTOL / 2
    assert _mismatch(foreign, weight) > 2 * BASE_MISMATCH_RTOL


# ------------------------------------------------------------------ 6. transformers' adapter API


def test_an_adapter_loaded_while_merged_is_checked_against_the_unmerged_base(tiny_inputs):
    """Loading an adapter's own weights while it is merged is not taken for another base: the base check reads the
    kept original weight, not the merged one (which differs by the adapter's own update); unmerge stays exact."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    model = get_peft_model(_base(), fura.FuraConfig(init_weights=False))
    original = {name: tensor.clone() for name, tensor in model.base_model.model.state_dict().items()}
    adapter = {name: tensor.clone() for name, tensor in get_peft_model_state_dict(model).items()}
    model.merge_adapter()
    set_peft_model_state_dict(model, adapter)
    model.unmerge_adapter()
    for name, tensor in model.base_model.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_merged_layers_keep_every_tensor_registered_for_load_state_dict():
    """PEFT's ``test_merge_layers_load_state_dict`` without FuRA's base check (which refuses its all-ones state
    dict, a deliberate difference of the conformance suite): after a merge every tensor loads and reads back."""
    model = get_peft_model(_base(), fura.FuraConfig(init_weights=False, check_base_model=False))
    state = {name: torch.ones_like(tensor) for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    model.load_state_dict(state)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_transformers_adapter_api_with_two_fura_adapters(tmp_path, tiny_inputs):
    first, weights = _saved_adapter(tmp_path, fura.FuraConfig(init_weights=False), seed=1, name="first")
    second, _ = _saved_adapter(tmp_path, fura.FuraConfig(init_weights=False), seed=2, name="second")
    expected = {}
    for name, folder in (("first", first), ("second", second)):
        base = _base(7)
        base.load_state_dict(weights)
        expected[name] = _logits(PeftModel.from_pretrained(base, folder), tiny_inputs)
    model = _base(7)
    model.load_state_dict(weights)
    reference = _logits(model, tiny_inputs)
    model.load_adapter(str(first))
    assert torch.allclose(_logits(model, tiny_inputs), expected["first"], atol=1e-6)
    model.load_adapter(str(second), adapter_name="second")  # as with LoRA, the adapter loaded last is active
    assert torch.allclose(_logits(model, tiny_inputs), expected["second"], atol=1e-6)
    model.set_adapter("default")
    assert torch.allclose(_logits(model, tiny_inputs), expected["first"], atol=1e-6)
    model.set_adapter("second")
    assert torch.allclose(_logits(model, tiny_inputs), expected["second"], atol=1e-6)
    model.disable_adapters()
    assert torch.equal(_logits(model, tiny_inputs), reference)
    model.enable_adapters()
    assert torch.allclose(_logits(model, tiny_inputs), expected["second"], atol=1e-6)


# ------------------------------------------------------------------ 7. Conv1D (GPT-2)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_with_default_targets(tmp_path, tiny_inputs):
    base = _tiny_gpt2()
    weights = copy.deepcopy(base.state_dict())
    reference = _logits(base, tiny_inputs)
    model = get_peft_model(base, fura.FuraConfig())  # no targets given: the GPT-2 defaults
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, FuraLayer)})
    assert names == ["c_attn", "c_fc", "c_proj"] and len(_fura_layers(model)) == 2 * 4
    assert torch.equal(_logits(model, tiny_inputs), reference)  # exact at init
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(tiny_inputs, labels=tiny_inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = _logits(model, tiny_inputs)
    assert not torch.allclose(trained, reference, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, tiny_inputs), trained, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(_logits(model, tiny_inputs), trained)
    model.save_pretrained(tmp_path)
    fresh = _tiny_gpt2()
    fresh.load_state_dict(weights)
    assert torch.allclose(_logits(PeftModel.from_pretrained(fresh, tmp_path), tiny_inputs), trained, atol=1e-6)


# ------------------------------------------------------------------ 8. validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_weights": "False"}, r"init_weights must be True or False, got 'False' \(str\)"),
        ({"check_base_model": 0}, r"check_base_model must be True or False"),
        ({"rank": "-5"}, r"rank must be positive, got -5"),
        ({"rank": "1.5"}, r"parameter budget in \(0, 1\), got 1.5"),
        ({"rank_pattern": {"q_proj": "zero"}}, r"rank_pattern\['q_proj'\] 'zero' is not 'full'"),
    ],
)
def test_config_values_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fura.FuraConfig(**kwargs)


def test_per_module_keys_that_match_nothing_name_the_valid_keys():
    base = _base()
    before = _state(base)
    with pytest.raises(
        ValueError, match=r"decomp_mode: key\(s\) \['q_prj'\] match no group.*mlp_down.*qkv.*down_proj.*q_proj"
    ):
        get_peft_model(base, fura.FuraConfig(decomp_mode={"q_prj": "input_one_block"}))
    assert _state(base) == before


def test_a_layer_without_a_good_factorisation_warns_with_the_count_and_the_fix():
    model = nn.Sequential(nn.Linear(97, 64), nn.Linear(64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, fura.FuraConfig(target_modules=["0", "1"]))
    messages = [str(w.message) for w in caught if "FuRA module" in str(w.message)]
    assert len(messages) == 1  # the 64x64 layer (blocks of 8) is fine
    assert "'0' (64x97)" in messages[0] and "6,272 numbers for a weight of 6,208" in messages[0]
    assert "rank_pattern" in messages[0] and "exclude_modules" in messages[0]
    assert "input_features = 97 has no block split near its square root" in messages[0]


def test_costly_plan_warnings_name_the_real_cause():
    """A 16-input layer with 4 outputs splits fine (4 x 4) but trains more numbers than it has: say that, not "no
    split near its square root"; a head split is named as the heads."""
    from fura.tuner.factorize import HeadInfo, make_plan
    from fura.tuner.model import _warn_poor_factorization

    def messages(plan, name="m.mlp.proj", heads=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _warn_poor_factorization(plan, name, heads)
        return " ".join(str(w.message) for w in caught)

    small = messages(make_plan(4, 16))
    assert "trains 80 numbers for a weight of 64" in small and "output_features = 4" in small
    assert "square root" not in small
    heads = HeadInfo(num_heads=2, num_kv_heads=2, head_dim=48)
    head = messages(
        make_plan(96, 96, module_name="h.attn.c_proj", leaf_name="c_proj", heads=heads, factorize_by_head=True),
        "h.attn.c_proj",
        heads,
    )
    assert "following the attention heads" in head and "square root" not in head
    assert messages(make_plan(64, 64)) == ""
