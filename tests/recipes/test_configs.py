"""The paper's tracks as YAML recipes under configs/: each file parses with its recipe and holds only known keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fura.recipes import grpo, sft, vlm

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: configs/<file> → the recipe module that reads it.
RECIPES = {"commonsense.yaml": sft, "qfura.yaml": sft, "grpo_math.yaml": grpo, "llava.yaml": vlm}


def test_every_track_recipe_is_listed() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_track_recipes_parse_and_resolve(name: str) -> None:
    recipe = RECIPES[name]
    settings = recipe.resolve_settings(recipe.parse_settings(["--config", str(CONFIGS / name)]))
    values = settings.to_dict()
    assert values["method"] in ("fura", "qfura") and values["track"] in ("commonsense", "rl", "vlm")
    assert values["output_dir"].startswith("runs/")
