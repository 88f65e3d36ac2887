"""Fixtures of the I/O tests: the tiny Llama folder shared with the recipe tests."""

from ..recipes.conftest import tiny_model_dir  # noqa: F401 - shared session fixture
