"""Command-line flags shared by the training pipelines, mapped onto config keys.

A *config flag* stores its value under ``cfg:<dotted key>`` with no default, so only the flags a user actually gives
override the YAML file; :func:`config_overrides` collects them as ``{"training.learning_rate": 1e-4, ...}`` for
:func:`fura.recipes.config.build_config`. The GRPO and VLM pipelines can build their flags the same way:
:func:`add_run_arguments` gives the flags every run has (``--config``, ``--model``, ``--method``, ``--track``,
``--method-arg``, ``--dtype``, ``--output-dir``, ``--resume``, ``--overwrite``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fura.recipes.methods import METHODS, TRACKS

_PREFIX = "cfg:"


def add_config_flag(parser: argparse.ArgumentParser | Any, *flags: str, key: str, **kwargs: Any) -> argparse.Action:
    """Add a flag that overrides config key ``key`` (dotted) only when given on the command line."""
    if kwargs.get("action") not in ("store_true", "store_false", argparse.BooleanOptionalAction):
        choices = kwargs.get("choices")
        short = choices is not None and len(choices) <= 6
        kwargs.setdefault("metavar", "{" + ",".join(choices) + "}" if short else key.rsplit(".", 1)[-1].upper())
    return parser.add_argument(*flags, dest=_PREFIX + key, default=argparse.SUPPRESS, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{dotted key: value}`` of the config flags given on the command line."""
    overrides = {k[len(_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(_PREFIX)}
    pairs = overrides.pop("method_args", None)
    if pairs:
        overrides["method_args"] = parse_key_values(pairs)
    return overrides


def parse_key_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``["r=16", "target_modules=[q_proj, v_proj]"]`` → ``{"r": 16, "target_modules": ["q_proj", "v_proj"]}``.

    Values are read as YAML scalars / flow collections (``16`` → int, ``true`` → bool, ``[a, b]`` → list).
    """
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            result[key.strip()] = value
    return result


def add_run_arguments(parser: argparse.ArgumentParser, default_track: str = "commonsense") -> None:
    """The flags every training run has: config file, model, method, track, method arguments, dtype, run folder."""
    group = parser.add_argument_group("run")
    group.add_argument("--config", metavar="YAML", help="settings file; flags given on the command line override it")
    add_config_flag(
        group,
        "--model",
        key="model",
        help="base model: a local Hugging Face folder, a Hub id (online only) or 'smollm2' (the default)",
    )
    add_config_flag(
        group,
        "--method",
        key="method",
        choices=list(METHODS),
        help=f"fine-tuning method (default: fura): {', '.join(METHODS)}",
    )
    add_config_flag(
        group,
        "--track",
        key="track",
        choices=list(TRACKS),
        help=f"whose reference hyper-parameters the method uses (default: {default_track})",
    )
    add_config_flag(
        group,
        "--method-arg",
        key="method_args",
        action="append",
        metavar="KEY=VALUE",
        help="method argument overriding the track default, e.g. r=16 or target_modules=[q_proj,v_proj] "
        "(repeatable; `fura methods` lists the defaults)",
    )
    add_config_flag(
        group,
        "--dtype",
        key="dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the base weights (default: auto = bf16 on a GPU that has it, else float32)",
    )
    add_config_flag(
        group, "--output-dir", "-o", key="output_dir", metavar="DIR", help="run folder (default: runs/<model>-<method>)"
    )
    group.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last complete checkpoint"
    )
    group.add_argument("--overwrite", action="store_true", help="delete the run in --output-dir and start again")
    add_config_flag(
        group,
        "--trust-remote-code",
        key="trust_remote_code",
        action="store_true",
        help="allow custom model code from the model folder / Hub",
    )
    group.add_argument("--print-config", action="store_true", help="print the merged settings as YAML and exit")
