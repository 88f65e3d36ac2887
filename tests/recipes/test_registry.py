"""The method registry: every method is listed, carries the reference's values per track, and refuses unknown
arguments, methods and tracks with the valid ones."""

from __future__ import annotations

import pytest

from fura.recipes.registry import METHODS, get_method


def test_registry_covers_every_method() -> None:
    assert set(METHODS) == {
        "fura", "lora", "dora", "pissa", "oft", "full", "svd", "fura-explicit", "qlora", "qdora", "qfura", "qfura-nf4"
    }  # fmt: skip


def test_track_defaults_follow_the_reference() -> None:
    lora_rl = get_method("lora").defaults("rl")
    assert (lora_rl.method_args["r"], lora_rl.method_args["lora_alpha"], lora_rl.training["learning_rate"]) == (
        32, 32, 9e-5,
    )  # fmt: skip
    assert get_method("full").defaults("rl").training["learning_rate"] == 1e-5
    assert get_method("fura").defaults("rl").training["learning_rate"] == 9e-5
    assert get_method("pissa").defaults("commonsense").method_args["init_lora_weights"] == "pissa_niter_4"
    qlora = get_method("qlora").defaults("commonsense")
    assert (qlora.method_args["r"], qlora.method_args["lora_alpha"], qlora.training["optim"]) == (
        48, 96, "paged_adamw_8bit",
    )  # fmt: skip
    assert get_method("fura").defaults("vlm").method_args == {"factorize_by_head": False, "bias": "none"}
    assert get_method("qdora").defaults("rl") is get_method("qdora").defaults("commonsense")  # fallback


def test_unknown_arguments_methods_and_tracks_are_errors() -> None:
    with pytest.raises(ValueError, match=r"does not take argument\(s\) rank.*Valid: .*lora_alpha"):
        get_method("lora").resolve_args("commonsense", {"rank": 4})
    with pytest.raises(ValueError, match=r"Valid: .*train_position"):
        get_method("svd").resolve_args("commonsense", {"r": 4})
    assert "double_quant" in get_method("qlora").valid_arg_names()
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        get_method("lorra")
    with pytest.raises(ValueError, match="unknown track"):
        get_method("fura").defaults("vision")
