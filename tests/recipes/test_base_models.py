"""The base model as the recipes see it: model paths (and the smollm2 alias) and dtype names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fura.recipes.base_models import DTYPE_NAMES, resolve_dtype, resolve_model_path


def test_model_and_dtype_resolution(monkeypatch, tmp_path: Path) -> None:
    import fura.io.assets

    monkeypatch.setattr(fura.io.assets, "smollm2_path", lambda: tmp_path / "SmolLM2")
    assert resolve_model_path("smollm2") == str(tmp_path / "SmolLM2")
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FileNotFoundError):
        resolve_model_path("./no/such/folder")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    assert {resolve_dtype(name) for name in DTYPE_NAMES} == {torch.float32, torch.bfloat16, torch.float16}
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")
