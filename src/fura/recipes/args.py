"""Recipe settings: dataclasses parsed by TRL's ``TrlParser`` (a YAML file plus flags, as TRL's own scripts do).

Details: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from trl import TrlParser

logger = logging.getLogger(__name__)


class RecipeArgumentError(ValueError):
    """A flag or YAML setting that the recipe does not know, or cannot read."""


#: The two names transformers has used for activation (gradient) checkpointing.
CHECKPOINTING = frozenset({"activation_checkpointing", "gradient_checkpointing"})


def repeatable(help: str, metavar: str) -> dict[str, Any]:
    """Field metadata of a list flag that may be repeated (``--x A --x B``) or take several values (``--x A B``)."""
    return {"help": f"{help} (repeatable)", "action": "extend", "metavar": metavar}


@dataclass
class RunArguments:
    """Which model to fine-tune with which method (every recipe; the fields in full: ``docs/recipes/skeleton.md``)."""

    model: str = field(default="smollm2", metadata={"help": "base model: folder, Hub id (online) or 'smollm2'"})
    method: str = field(default="fura", metadata={"help": "fine-tuning method (see `fura methods`)"})
    track: str = field(default="commonsense", metadata={"help": "whose reference defaults fill unset settings"})
    method_arg: list[str] = field(
        default_factory=list, metadata=repeatable("method argument KEY=VALUE overriding the track default", "KEY=VALUE")
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the base weights", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --output_dir and start again"})
    print_config: bool = field(default=False, metadata={"help": "print the resolved settings as YAML and exit"})

    def method_args(self) -> dict[str, Any]:
        """``method_arg`` as a dict (``["r=16"]`` → ``{"r": 16}``)."""
        return parse_key_values(self.method_arg)


@dataclass
class TrlConfigDefaults:
    """The defaults every recipe's TRL config (``SFTConfig``, ``GRPOConfig``) sets apart from TRL's (the fields below;
    TRL's values: ``docs/recipes/skeleton.md``). ``trust_remote_code`` is set by ``--trust_remote_code``."""

    output_dir: str | None = field(default=None, metadata={"help": "the run folder (default: under runs/)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (4-bit methods: paged_adamw_8bit)"})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "deprecated alias of activation_checkpointing (off unless set)", "nargs": "?", "const": True},
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 autocast; unless set, on a GPU that supports it"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    # None first: TRL's parser tests isinstance(None, <second member>), which fails for list[str]
    report_to: None | str | list[str] = field(default="none", metadata={"help": "experiment trackers"})  # noqa: RUF036
    trust_remote_code: bool = field(default=False, init=False, metadata={"help": "set by --trust_remote_code"})


def parse_key_values(pairs: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``["r=16", "target_modules=[q_proj, v_proj]"]`` → ``{"r": 16, "target_modules": ["q_proj", "v_proj"]}``.

    Values are read as YAML scalars / flow collections (``16`` → int, ``true`` → bool, ``[a, b]`` → list). A mapping
    (from a YAML config) is returned as a dict.
    """
    import yaml

    if isinstance(pairs, Mapping):
        return dict(pairs)
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise RecipeArgumentError(f"--method_arg expects KEY=VALUE, got {pair!r}. Fix: e.g. --method_arg r=16.")
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            result[key.strip()] = value
    return result


@dataclass
class ParsedArguments:
    """The dataclass instances of one parse, and which fields the user set (in the YAML file or as flags)."""

    values: tuple[Any, ...]
    explicit: set[str]
    config_file: Path | None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with defaults, wrapped at spaces only (``qfura-nf4`` stays one word on one line)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class RecipeParser(TrlParser):
    """TRL's parser with one-line errors, no prefix matching, typed YAML values and the set of explicit fields."""

    def __init__(self, dataclass_types: Sequence[type], prog: str, description: str, epilog: str = "") -> None:
        super().__init__(
            dataclass_types=list(dataclass_types),
            prog=prog,
            description=description,
            epilog=epilog,
            allow_abbrev=False,
            formatter_class=HelpFormatter,
        )
        self._config_keys: set[str] = set()
        self._config_path: Path | None = None

    def describe_methods(self) -> None:
        """List the registry's methods and tracks in the help of ``--method`` / ``--track``."""
        from fura.recipes.registry import METHODS, TRACKS

        for action in self._actions:
            if action.dest == "method":
                action.help = f"fine-tuning method: {', '.join(METHODS)}"
            elif action.dest == "track":
                action.help = f"whose reference defaults fill unset settings: {', '.join(TRACKS)}"

    def parse(self, argv: Sequence[str]) -> ParsedArguments:
        """Parse ``argv`` (``--config FILE`` first, then flags) into the dataclasses; errors raise
        :class:`RecipeArgumentError` with one line naming the flag, file or field and the fix."""
        self._config_path = _config_path(argv)
        try:
            values = self.parse_args_and_config(argv)
        except RecipeArgumentError:
            raise
        except (ValueError, TypeError) as exc:  # a dataclass refused a value in __post_init__
            raise RecipeArgumentError(f"{self.prog}: {exc}") from None
        for value in values:
            if getattr(value, "max_steps", -1) == 0:  # transformers would train one step
                raise RecipeArgumentError(
                    f"{self.prog}: max_steps 0 trains nothing. Fix: a positive number of steps, or -1 to train "
                    "num_train_epochs epochs."
                )
        given = self._given_on_command_line([a for a in argv if a != "--config" and a != str(self._config_path)])
        return ParsedArguments(tuple(values), self._config_keys | given, self._config_path)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):  # type: ignore[override]
        known = set(self._option_string_actions)
        flags = [token.split("=", 1)[0] for token in args or [] if token.startswith("-") and not _is_number(token)]
        unknown = [flag for flag in flags if flag not in known]
        if unknown:
            hint = _did_you_mean(unknown[0], known, cutoff=0.7)
            raise RecipeArgumentError(
                f"{self.prog}: unknown flag {unknown[0]}{hint}. Fix: see `{self.prog} --help` for the flags."
            )
        return super().parse_args_into_dataclasses(args, return_remaining_strings=return_remaining_strings, **kwargs)

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """YAML values become the defaults, converted with the flag's type (YAML reads ``2e-4`` as a string)."""
        by_dest: dict[str, list[argparse.Action]] = {}
        for action in self._actions:  # a bool field has two actions (--x and --no_x) with one destination
            by_dest.setdefault(action.dest, []).append(action)
        unknown = sorted(set(kwargs) - set(by_dest))
        if unknown:
            hint = _did_you_mean(unknown[0], by_dest)
            raise RecipeArgumentError(
                f"{self._config_path}: unknown setting {unknown[0]!r}{hint}. Fix: remove it or use a field listed by "
                f"`{self.prog} --help`."
            )
        from fura.recipes.setting_types import field_types

        annotations = field_types(self.dataclass_types)
        for key, value in kwargs.items():
            typed = _typed(by_dest[key][0], value, key, self._config_path, annotations.get(key, Any))
            for action in by_dest[key]:
                action.default = typed
                action.required = False
        self._config_keys = set(kwargs)
        return []

    def _given_on_command_line(self, argv: Sequence[str]) -> set[str]:
        """Destinations of the flags present in ``argv`` (parsed again with every default suppressed)."""
        saved = [(action, action.default) for action in self._actions]
        parser_defaults, self._defaults = self._defaults, {}  # parser.set_defaults(...) is not the user's either
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            namespace, _ = argparse.ArgumentParser.parse_known_args(self, list(argv), argparse.Namespace())
        finally:
            self._defaults = parser_defaults
            for action, default in saved:
                action.default = default
        return set(vars(namespace))

    def error(self, message: str) -> NoReturn:
        """argparse's errors (a bad value, a missing argument) as a :class:`RecipeArgumentError` (one line, exit 2)."""
        raise RecipeArgumentError(f"{self.prog}: {message}. Fix: see `{self.prog} --help`.")


def _config_path(argv: Sequence[str]) -> Path | None:
    if "--config" not in argv:
        return None
    index = list(argv).index("--config")
    if index + 1 >= len(argv):
        raise RecipeArgumentError("--config needs a YAML file. Fix: --config path/to/run.yaml.")
    path = Path(argv[index + 1])
    if not path.is_file():
        raise RecipeArgumentError(f"--config {path}: no such file. Fix: give the path of a YAML settings file.")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeArgumentError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}). Fix: write one `name: value` per line."
        ) from None
    if not isinstance(data, dict):
        raise RecipeArgumentError(
            f"{path}: expected a mapping of settings (`name: value` lines), got {type(data).__name__}."
        )
    return path


def _did_you_mean(name: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean X?)`` with the closest of ``known`` to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _typed(action: argparse.Action, value: Any, key: str, path: Path | None, annotation: Any = Any) -> Any:
    """A YAML value converted like the flag's own value would be (``"2e-4"`` → 2e-4 for a float field), then checked
    against the field's type annotation (:func:`fura.recipes.setting_types.accepts`): ``max_steps: [1, 2]``,
    ``max_steps: 2.9``, ``max_steps: true`` or ``seed: null`` are refused with the file, the field and the type.
    A single value for a list field (``train_files: a.json``) is a list of one."""
    from fura.recipes.setting_types import accepts, describe

    convert = action.type if callable(action.type) else None
    if isinstance(value, str) and action.nargs in ("+", "*") and not accepts(annotation, value):
        value = [value]
    try:
        if convert is not None and isinstance(value, list) and action.nargs in ("+", "*"):
            value = [convert(item) if isinstance(item, str) else item for item in value]
        elif convert is not None and isinstance(value, str):
            value = convert(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise RecipeArgumentError(
            f"{path}: {key}: cannot read {value!r} ({getattr(convert, '__name__', 'value')} expected)."
        ) from None
    if not accepts(annotation, value):
        raise RecipeArgumentError(
            f"{path}: {key}: {value!r} is not a valid value ({describe(annotation)} expected). Fix: correct {key}."
        )
    return value


def unset_defaults(target: Any, defaults: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The entries of ``defaults`` that are fields of ``target`` and that the user did not set.

    Used to fill a method's reference training values for the track (``fura.recipes.registry``) into the trainer's
    arguments. ``gradient_checkpointing`` is renamed ``activation_checkpointing`` where transformers renamed it.
    """
    names = {f.name for f in dataclasses.fields(target) if f.init}
    defaults = dict(defaults)
    if "gradient_checkpointing" in defaults and "activation_checkpointing" in names:
        defaults["activation_checkpointing"] = defaults.pop("gradient_checkpointing")
    if CHECKPOINTING & explicit:  # set under either name, it is the user's
        explicit = explicit | CHECKPOINTING
    return {key: value for key, value in defaults.items() if key in names and key not in explicit}


def automatic_trainer_settings(explicit: set[str]) -> dict[str, Any]:
    """What the recipes decide when the user did not: bf16 autocast on a GPU that supports it (none on CPU), and a
    periodic held-out evaluation when ``eval_steps`` alone is given."""
    import torch

    changes: dict[str, Any] = {}
    if not {"bf16", "fp16"} & explicit and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        changes["bf16"] = True
    if "eval_steps" in explicit and "eval_strategy" not in explicit:
        changes["eval_strategy"] = "steps"
    return changes


def warn_slow_bf16(training: Any) -> bool:
    """Warn (and return True) when ``training`` asks for bf16 autocast on a CPU without AVX512-BF16 or AMX, where it
    runs about 20x slower than float32 (measured on an AVX2-only AMD EPYC)."""
    import torch

    if not getattr(training, "bf16", False) or torch.cuda.is_available():
        return False
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return False
    logger.warning(
        "--bf16 on a CPU without AVX512-BF16 or AMX (%s): bf16 autocast runs about 20x slower than float32 here. "
        "Fix: drop --bf16 (train in float32).",
        torch.backends.cpu.get_cpu_capability(),
    )
    return True


def settings_dict(*values: Any) -> dict[str, Any]:
    """One flat ``{field: value}`` mapping of the dataclasses — a valid ``--config`` file once dumped as YAML."""
    from fura.recipes.jsonable import jsonable

    flat: dict[str, Any] = {}
    for value in values:
        # TrainingArguments.to_dict: enums as values, tokens masked ("<HUB_TOKEN>": not a setting to write back)
        data = value.to_dict() if callable(getattr(value, "to_dict", None)) else dataclasses.asdict(value)
        for name in (f.name for f in dataclasses.fields(value) if f.init):
            if not (isinstance(data.get(name), str) and data[name].startswith("<") and data[name].endswith("_TOKEN>")):
                flat[name] = data.get(name)
    return jsonable(flat)


def dump_yaml(payload: Mapping[str, Any]) -> str:
    """YAML text of a mapping, keys in insertion order."""
    import yaml

    from fura.recipes.jsonable import jsonable

    return yaml.safe_dump(jsonable(dict(payload)), sort_keys=False, allow_unicode=True)
