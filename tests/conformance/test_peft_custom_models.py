"""PEFT's own generic tuner tests (``tests/test_custom_models.py`` of the installed PEFT) run against FuRA.

PEFT tests every tuner on small mock models (an MLP, an MLP with LayerNorm, an embedding + transformers ``Conv1D``
model, a deep MLP) with one matrix of configs. Here the same test functions run with a matrix of FuRA configs that
covers FuRA's knobs (biases are trained in PEFT's own bias tests, which set ``bias`` themselves, as PEFT's matrix does
not); tests tied to other methods (LoRA variants, IA³, …) are not collected. The few tests where
FuRA deliberately differs from PEFT's convention are listed in :data:`DELIBERATE_DIFFERENCES` with the reason; they
are strict xfails that must raise the named error (a pass, or another error, fails the suite).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from fura import FuraBaseMismatchError, FuraConfig

from . import upstream

peft_tests = upstream.load("test_custom_models")
globals().update(upstream.module_fixtures(peft_tests))  # e.g. the FSDP process group of TestPeftFsdpStateDict

#: (test name, PEFT mock model, config class, config kwargs), as PEFT's own TEST_CASES.
FURA_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    ("MLP 1 FuRA", "MLP", FuraConfig, {"target_modules": ["lin0"]}),
    ("MLP 2 FuRA", "MLP", FuraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP 3 FuRA regex", "MLP", FuraConfig, {"target_modules": "lin1"}),
    ("MLP 4 FuRA all-linear", "MLP", FuraConfig, {"target_modules": "all-linear"}),
    (
        "MLP 5 FuRA input_one_block",
        "MLP",
        FuraConfig,
        {"target_modules": ["lin0", "lin1"], "decomp_mode": "input_one_block"},
    ),
    ("MLP 6 FuRA int rank", "MLP", FuraConfig, {"target_modules": ["lin0", "lin1"], "rank": 2}),
    ("MLP 7 FuRA s frozen", "MLP", FuraConfig, {"target_modules": ["lin0", "lin1"], "s_merged_to": "frozen"}),
    ("MLP 8 FuRA s trainable", "MLP", FuraConfig, {"target_modules": ["lin0"], "s_merged_to": "trainable"}),
    ("MLP 9 FuRA s split", "MLP", FuraConfig, {"target_modules": ["lin0"], "s_merged_to": "split"}),
    ("MLP 10 FuRA qr", "MLP", FuraConfig, {"target_modules": ["lin0"], "convert_mode": "qr", "s_merged_to": "frozen"}),
    ("MLP 11 FuRA modules_to_save", "MLP", FuraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP 12 FuRA inverse unmerge", "MLP", FuraConfig, {"target_modules": ["lin0"], "exact_unmerge": False}),
    ("MLP 13 FuRA input_factorization", "MLP", FuraConfig, {"target_modules": ["lin0"], "input_factorization": "5,2"}),
    ("MLP_LayerNorm 1 FuRA", "MLP_LayerNorm", FuraConfig, {"target_modules": ["lin0", "lin1"]}),
    (
        "MLP_LayerNorm 2 FuRA modules_to_save",
        "MLP_LayerNorm",
        FuraConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["layernorm1"]},
    ),
    ("EmbConv1D 1 FuRA", "EmbConv1D", FuraConfig, {"target_modules": ["conv1d"]}),
    ("EmbConv1D 2 FuRA", "EmbConv1D", FuraConfig, {"target_modules": ["conv1d", "lin0"]}),
]

#: (test name, tuner method, config class, kwargs of adapter 1, kwargs of adapter 2), as PEFT's own matrix.
FURA_MULTI_ADAPTER_CASES: list[tuple[str, str, type, dict[str, Any], dict[str, Any]]] = [
    (
        "FuRA Same",
        "fura",
        FuraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "FuRA Different",
        "fura",
        FuraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        "FuRA input_one_block and default",
        "fura",
        FuraConfig,
        {"target_modules": ["lin0", "lin1"], "init_weights": False, "decomp_mode": "input_one_block"},
        {"target_modules": ["lin0", "lin1"], "init_weights": False},
    ),
]

_OTHER_BASE = (
    "a FuRA adapter holds its base model's block singular vectors, so loading it onto a different base is refused "
    "(FuraBaseMismatchError); this test saves an adapter made on one randomly initialised DeepMLP and loads it onto "
    "another (check_base_model=False would accept it)"
)

_FOREIGN_STATE_DICT = (
    "a FuRA adapter's block basis and singular values are checked against the base weight when a state dict is "
    "loaded; this test loads a state dict of all ones, whose basis is no singular basis of any weight, so it is "
    "refused as an adapter of another base (FuraBaseMismatchError). Merged layers do keep every parameter "
    "registered: the test passes with check_base_model=False (tests/tuner/test_peft_conventions.py) and under "
    "convert_mode='qr', which has no singular values to check"
)


def _checks_singular_values(config_kwargs: dict[str, Any]) -> bool:
    return config_kwargs.get("convert_mode", "svd") == "svd"


#: Tests where FuRA deliberately differs from PEFT's convention: {test function name: (reason, the error it raises,
#: the configs it applies to, or None for all)}.
DELIBERATE_DIFFERENCES: dict[str, tuple[str, type[BaseException], Callable[[dict[str, Any]], bool] | None]] = {
    "test_loading_model_requires_grad_set_correctly": (_OTHER_BASE, FuraBaseMismatchError, None),
    "test_loading_model_with_modules_to_save_requires_grad_set_correctly": (_OTHER_BASE, FuraBaseMismatchError, None),
    "test_merge_layers_load_state_dict": (_FOREIGN_STATE_DICT, FuraBaseMismatchError, _checks_singular_values),
}


def _deliberate(name: str, values: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(rows, marks)``: rows of a matrix with a strict xfail on those where test ``name`` deliberately differs.

    A difference that applies to every row becomes a mark of the whole function (the second list).
    """
    if name not in DELIBERATE_DIFFERENCES:
        return list(values), []
    reason, error, applies = DELIBERATE_DIFFERENCES[name]
    xfail = pytest.mark.xfail(strict=True, reason=reason, raises=error)
    if applies is None or not isinstance(values[0], tuple):
        return list(values), [xfail.mark]
    return [pytest.param(*row, marks=xfail) if applies(row[-1]) else row for row in values], []


def _matrix_marks(name: str, function: Any, matrices: dict[int, Sequence[Any]]) -> list[Any] | None:
    """The function's marks with PEFT's config matrices swapped for FuRA's; None if it uses none of them."""
    marks, swapped = [], False
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize" and id(mark.args[1]) in matrices:
            values = matrices[id(mark.args[1])]
            ids = [row[0] for row in values] if isinstance(values[0], tuple) else None
            rows, function_marks = _deliberate(name, values)
            marks.append(pytest.mark.parametrize(mark.args[0], rows, ids=ids).mark)
            marks.extend(function_marks)
            swapped = True
        else:
            marks.append(mark)
    return marks if swapped else None


def _swapped_globals(function: Any, matrices: dict[int, Sequence[Any]]) -> dict[str, Any]:
    """The function's module globals with PEFT's matrices swapped for FuRA's, for tests that read a matrix in their
    body (e.g. the row of ``TEST_CASES`` for a config class)."""
    namespace = dict(function.__globals__)
    for name, value in function.__globals__.items():
        if id(value) in matrices:
            namespace[name] = matrices[id(value)]
    return namespace


def fura_test_class(name: str, peft_class: type, matrices: dict[int, Sequence[Any]]) -> type:
    """A subclass of ``peft_class`` whose test methods are those parametrised by ``matrices``, re-parametrised.

    ``matrices`` maps ``id(PEFT matrix)`` to FuRA's replacement. Test methods that do not use one of PEFT's
    matrices are method-specific (LoRA variants, IA³ …) and are not collected (set to None in the subclass).
    """
    namespace: dict[str, Any] = {"__module__": __name__}
    for attribute in dir(peft_class):
        if not attribute.startswith("test_"):
            continue
        original = getattr(peft_class, attribute)
        marks = _matrix_marks(attribute, original, matrices)
        if marks is None:
            namespace[attribute] = None
            continue
        copy = types.FunctionType(
            original.__code__,
            _swapped_globals(original, matrices),
            attribute,
            original.__defaults__,
            original.__closure__,
        )
        copy.__kwdefaults__ = original.__kwdefaults__
        copy.__doc__ = original.__doc__
        copy.pytestmark = marks
        namespace[attribute] = copy
    return type(name, (peft_class,), namespace)


def _configs(rows: Iterable[tuple]) -> list[type]:
    return sorted({row[2] for row in rows}, key=lambda cls: cls.__name__)


_MATRICES = {
    id(peft_tests.TEST_CASES): FURA_CASES,
    id(peft_tests.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): FURA_MULTI_ADAPTER_CASES,
    id(peft_tests.ALL_PEFT_CONFIG_CLASSES): _configs(FURA_CASES),
}

TestFuraCustomModels = fura_test_class("TestFuraCustomModels", peft_tests.TestPeftCustomModel, _MATRICES)
TestFuraMultipleActiveAdapters = fura_test_class(
    "TestFuraMultipleActiveAdapters", peft_tests.TestMultipleActiveAdapters, _MATRICES
)
TestFuraRequiresGrad = fura_test_class("TestFuraRequiresGrad", peft_tests.TestRequiresGrad, _MATRICES)
TestFuraFsdpStateDict = fura_test_class("TestFuraFsdpStateDict", peft_tests.TestPeftFsdpStateDict, _MATRICES)
