"""The ``fura`` command line.

    fura train sft     supervised fine-tuning with any method (--method fura|lora|dora|pissa|full|svd|qlora|...)
    fura train grpo    GRPO math RL                       (fura.recipes.grpo)
    fura train vlm     LLaVA-style visual instruction tuning (fura.recipes.vlm)
    fura eval commonsense|math   evaluate a base model (+ adapter), a merged folder or a run folder
    fura merge         adapter -> dense Hugging Face folder (merge_and_unload), written atomically
    fura export lora   the best rank-r LoRA approximation of a FuRA adapter
    fura convert       FuRA block plans and parameter counts of a model, on the meta device (no weights)
    fura methods       the method registry and its reference defaults per track
    fura stream        layer-streaming conversion of checkpoints too large to load
    fura bench         benchmarks (fura.apps.bench)
    fura demo          the offline CPU demo (fura.apps.demo)

Nothing here imports the library until a command runs: ``fura --help`` and argument errors cost the interpreter
only. The training recipes parse their own arguments (TRL's ``TrlParser``: ``--config`` YAML plus flags): everything
after ``fura train <pipeline>`` is handed to the recipe's ``main(argv)``. The other pluggable commands (``bench``,
``demo``) declare their flags with an ``add_arguments``-style hook of their module, imported only when the command is
named. Every user error exits with status 2 and one line that says what is wrong and the fix.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger("fura.cli")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
#: The --dtype choices of the commands that load a model.
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Plugin:
    """A command implemented in another module, imported on demand.

    Attributes:
        module: the module path.
        entry: the function called with the parsed ``argparse.Namespace``; returns the exit status.
        help: one line for the command list.
        what: what the module is, for the "not available" message.
        arguments: the module's optional ``(parser) -> None`` hook that declares the command's flags.
    """

    module: str
    entry: str
    help: str
    what: str
    arguments: str = "add_arguments"


TRAIN_PLUGINS: dict[str, Plugin] = {
    "sft": Plugin(
        "fura.recipes.sft",
        "main",
        "supervised fine-tuning on LLM-Adapters data (commonsense, math)",
        "the SFT pipeline",
    ),
    "grpo": Plugin("fura.recipes.grpo", "main", "GRPO math RL with math-verify rewards", "the GRPO pipeline"),
    "vlm": Plugin("fura.recipes.vlm", "main", "LLaVA-style visual instruction tuning", "the VLM pipeline"),
}
TOP_PLUGINS: dict[str, Plugin] = {
    "bench": Plugin(
        "fura.apps.bench",
        "bench_cli",
        "step time / memory / parameter benchmarks",
        "the benchmark harness",
        arguments="add_bench_arguments",
    ),
    "demo": Plugin("fura.apps.demo", "main", "the offline CPU demo", "the demo"),
}


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--learning-rat`` is an error, not ``--learning-rate``) and with one-line
    errors (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class PluginUnavailableError(RuntimeError):
    """A pluggable command's module is not installed (yet)."""


def _import_plugin(plugin: Plugin) -> ModuleType:
    try:
        return importlib.import_module(plugin.module)
    except ModuleNotFoundError as exc:
        if exc.name and plugin.module.startswith(exc.name):
            raise PluginUnavailableError(
                f"{plugin.what} is not available in this installation: module {plugin.module} does not exist yet."
            ) from None
        raise PluginUnavailableError(f"{plugin.what} ({plugin.module}) needs a missing package: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


def _selected(argv: Sequence[str]) -> list[str]:
    """The command words of ``argv`` (positional tokens before the first option after the command)."""
    words = []
    for token in argv:
        if token.startswith("-"):
            if words:
                break
            continue
        words.append(token)
        if len(words) == 2:
            break
    return words


def _add_plugin(subparsers: Any, name: str, plugin: Plugin, load: bool, fallback: Any) -> None:
    parser = subparsers.add_parser(name, help=plugin.help, description=plugin.help)
    parser.set_defaults(plugin=plugin)
    module = None
    if load:
        try:
            module = _import_plugin(plugin)
        except PluginUnavailableError as exc:
            parser.description = f"{plugin.help}\n\nNOT AVAILABLE: {exc}"
    if module is not None and hasattr(module, plugin.arguments):
        getattr(module, plugin.arguments)(parser)
    else:
        fallback(parser)


def _raw_args(parser: argparse.ArgumentParser) -> None:
    """No declared flags: every further argument reaches the command as ``args.argv``."""
    parser.set_defaults(accepts_raw_args=True)
    parser.epilog = "Further arguments are passed on to the command unparsed (args.argv)."


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``fura`` parser; the pluggable command named in ``argv`` (if any) gets its module's flags."""
    words = _selected(argv)
    parser = Parser(
        prog="fura",
        description="FuRA (Full-Rank Adaptation) fine-tuning: train, evaluate, merge and inspect adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fura <command> --help` for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks on errors)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train a model (sft, grpo, vlm)", description="Train a model.")
    pipelines = train.add_subparsers(dest="pipeline", metavar="PIPELINE", required=True, parser_class=Parser)
    for name, plugin in TRAIN_PLUGINS.items():
        # the recipe parses its own arguments (fura train <pipeline> --help shows them)
        recipe = pipelines.add_parser(name, help=plugin.help, description=plugin.help, add_help=False)
        recipe.set_defaults(plugin=plugin, recipe_argv=True)

    _add_eval_parsers(commands)
    _add_merge_parser(commands)
    _add_export_parser(commands)
    _add_convert_parser(commands)
    _add_methods_parser(commands)
    _add_stream_parser(commands)
    for name, plugin in TOP_PLUGINS.items():
        _add_plugin(commands, name, plugin, words[:1] == [name], _raw_args)
    return parser


def recipe_split(argv: Sequence[str]) -> int | None:
    """Where a recipe's own arguments start in ``argv`` (after ``train <pipeline>``), or None."""
    words = [(index, token) for index, token in enumerate(argv) if not token.startswith("-")][:2]
    if len(words) == 2 and words[0][1] == "train" and words[1][1] in TRAIN_PLUGINS:
        return words[1][0] + 1
    return None


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="base model (folder, Hub id, smollm2), merged folder, adapter folder or run folder",
    )
    parser.add_argument("--adapter", help="PEFT adapter folder applied on top of --model (FuRA, LoRA, ...)")
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="dtype of the weights (default auto: bf16 on a GPU, else fp32)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")


def _add_eval_parsers(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model", description="Evaluate a model (+ adapter).")
    kinds = evaluate.add_subparsers(dest="kind", metavar="BENCHMARK", required=True)
    cs = kinds.add_parser("commonsense", help="the 8-task commonsense benchmark (accuracy per task and average)")
    math = kinds.add_parser("math", help="math accuracy (numeric or math-verify grading)")
    for parser in (cs, math):
        _add_model_flags(parser)
        parser.add_argument("--data", help="commonsense: folder of <task>.json test files; math: JSON/JSONL file")
        parser.add_argument(
            "--output-dir", "-o", help="where predictions and summaries go (default: <run>/eval for a run folder)"
        )
        parser.add_argument(
            "--prompt-style",
            default="fura",
            choices=["fura", "reference", "chat"],
            help="use the style the model was trained with (default fura)",
        )
        parser.add_argument("--max-examples", type=int, help="rows per task / file (default: all)")
        parser.add_argument("--batch-size", type=int, help="prompts per generate call")
        parser.add_argument("--num-beams", type=int, help="beam width (commonsense default 4, math greedy)")
        parser.add_argument("--max-new-tokens", type=int, help="new-token budget")
    cs.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to run (default: all 8 that have a file)")
    cs.add_argument(
        "--scoring",
        default="generate",
        choices=["generate", "loglik"],
        help="generate (the paper's protocol, default) or loglik: score each candidate label in one forward pass",
    )
    math.add_argument("--protocol", help="MATH-500, AIME-24, AIME-25 or AMC23 (sampling settings of the reference)")
    math.add_argument(
        "--grader", choices=["numeric", "math_verify"], help="default numeric (math_verify with --protocol)"
    )
    math.add_argument("--n-samples", type=int, help="completions per problem")
    math.add_argument("--temperature", type=float, help="0 = greedy")
    evaluate.set_defaults(handler=_cmd_eval)


def _add_adapter_io_flags(
    parser: argparse.ArgumentParser, adapter: str, output: str, dtypes: Sequence[str], dtype_help: str
) -> None:
    """``--adapter``, ``--model``, ``--output``, ``--dtype`` (default: the first of ``dtypes``) and ``--force``."""
    parser.add_argument("--adapter", required=True, help=f"{adapter} (or a run folder holding adapter/)")
    parser.add_argument("--model", help="base model (default: base_model_name_or_path of the adapter config)")
    parser.add_argument("--output", "-o", required=True, help=output)
    parser.add_argument("--dtype", default=dtypes[0], choices=list(dtypes), help=f"{dtype_help} (default {dtypes[0]})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")


def _add_merge_parser(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge an adapter into its base model and save a dense folder",
        description="Merge a PEFT adapter (FuRA, LoRA, DoRA, ...) into its base model with merge_and_unload and save "
        "a plain Hugging Face folder (+ tokenizer). Written to a temporary folder and renamed into place.",
    )
    _add_adapter_io_flags(merge, "adapter folder", "destination folder", DTYPES, "dtype of the merged weights")
    merge.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    merge.set_defaults(handler=_cmd_merge)


def _add_export_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="export an adapter in another format (lora: the best rank-r LoRA approximation of a FuRA adapter)",
        description="Export a FuRA adapter as a standard PEFT LoRA adapter: the best rank-r approximation of each "
        "module's update (truncated SVD), with the relative error per module in lora_export_report.json. A FuRA "
        "update is full rank, so this is approximate; `fura merge` gives the exact dense model.",
    )
    kinds = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    lora = kinds.add_parser("lora", help="approximate a FuRA adapter by a standard LoRA adapter (truncated SVD)")
    lora.add_argument("--rank", type=int, required=True, help="LoRA rank (min(rank, out, in) per module)")
    io_help = ("FuRA adapter folder", "destination folder of the LoRA adapter")
    _add_adapter_io_flags(lora, *io_help, DTYPES[1:], "dtype of the base weights while exporting")
    lora.add_argument("--adapter-name", default="default", help="adapter to export (default: default)")
    export.set_defaults(handler=_cmd_export)


def _add_convert_parser(commands: Any) -> None:
    convert = commands.add_parser(
        "convert",
        help="FuRA block plans and parameter counts of a model (no weights loaded)",
        description="Build the model from its config on the meta device, apply a FuraConfig and report the block "
        "plan, shapes and trainable parameters per module type, with LoRA counts on the same modules.",
    )
    convert.add_argument("--model", required=True, help="model folder, config.json file, Hub id (online) or smollm2")
    convert.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="modules to adapt (default: the 7 projections of Llama-style models; or all-linear)",
    )
    convert.add_argument("--decomp-mode", help="output_one_block (default) or input_one_block, or a per-group dict")
    convert.add_argument("--rank", help="'full' (default), an int, or a float budget in (0, 1)")
    convert.add_argument("--s-merged-to", help="singular values placement (default keep_trainable)")
    convert.add_argument("--input-factorization", help="'closest', 'head', 'n,b' or a per-group dict")
    convert.add_argument(
        "--factorize-by-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split o_proj's input by attention head (default on)",
    )
    convert.add_argument(
        "--lora-ranks",
        nargs="+",
        type=int,
        default=[32, 64],
        metavar="R",
        help="LoRA ranks to compare with (default 32 64)",
    )
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    convert.set_defaults(handler=_cmd_convert)


def _add_methods_parser(commands: Any) -> None:
    methods = commands.add_parser("methods", help="list the methods and their reference defaults")
    methods.add_argument("--track", default="commonsense", help="commonsense (default), rl or vlm")
    methods.set_defaults(handler=_cmd_methods)


def _add_stream_parser(commands: Any) -> None:
    help_text = "layer-streaming conversion of checkpoints too large to load (adapter or NF4 QFuRA)"
    stream = commands.add_parser("stream", help=help_text, description=help_text)
    steps = stream.add_subparsers(dest="stream_command", metavar="STEP", required=True, parser_class=Parser)
    make = steps.add_parser(
        "make-checkpoint", help="write a random Llama-shaped safetensors checkpoint (Llama-3-8B layer shapes)"
    )
    make.add_argument("path", help="output folder (config.json + one shard per decoder layer)")
    for flag, default in (("hidden", 4096), ("intermediate", 14336), ("layers", 4), ("heads", 32), ("kv-heads", 8)):
        make.add_argument(f"--{flag}", type=int, default=default, help=f"default {default}")
    make.add_argument("--vocab", type=int, default=32000, help="default 32000")
    make.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for name, step_help in (
        ("prepare", "write a FuRA adapter (FuraConfig defaults) one weight at a time"),
        ("qfura", "convert to the explicit NF4 QFuRA model one decoder layer at a time"),
    ):
        step = steps.add_parser(name, help=step_help, description=step_help)
        step.add_argument("model_dir", help="Hugging Face folder with safetensors weights (one file or shards)")
        step.add_argument("output_dir", help="written on success only; a non-empty one needs --force")
        step.add_argument("--force", action="store_true", help="replace a non-empty output_dir")
        step.add_argument("--report", help="also write the StreamReport (time and memory per layer) as JSON here")
        step.add_argument("--device", default="cpu", help="where the decompositions run (default cpu)")
        step.add_argument("--no-progress", action="store_true", help="no progress bar")
    stream.set_defaults(handler=_cmd_stream)


# ----------------------------------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------------------------------


def _run_plugin(args: argparse.Namespace) -> int:
    module = _import_plugin(args.plugin)
    entry = getattr(module, args.plugin.entry, None)
    if entry is None:
        raise PluginUnavailableError(f"{args.plugin.module} has no {args.plugin.entry}(args) entry point")
    status = entry(args.argv if getattr(args, "recipe_argv", False) else args)  # recipes parse their own arguments
    return 0 if status is None else int(status)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fura.recipes.artifacts import load_for_inference
    from fura.recipes.evaluation import EvalArguments, check_eval_data, run_evaluation

    if not (args.data or getattr(args, "protocol", None)):
        raise ValueError("--data is required (or --protocol for math). Fix: e.g. --data path/to/commonsense/test")
    settings = EvalArguments(
        eval=args.kind,
        eval_data=args.data,
        eval_tasks=getattr(args, "tasks", None),
        eval_scoring=getattr(args, "scoring", "generate"),
        eval_protocol=getattr(args, "protocol", None),
        eval_grader=getattr(args, "grader", None),
        eval_max_examples=args.max_examples,
        eval_batch_size=args.batch_size,
        eval_num_beams=args.num_beams,
        eval_max_new_tokens=args.max_new_tokens,
        eval_n_samples=getattr(args, "n_samples", None),
        eval_temperature=getattr(args, "temperature", None),
    )
    check_eval_data(settings, "--data")  # before any model is loaded
    model, tokenizer, _ = load_for_inference(args.model, args.adapter, args.dtype, args.trust_remote_code)
    output = args.output_dir
    if output is None and (Path(args.model) / "config.yaml").is_file():
        output = str(Path(args.model) / "eval")
    result = run_evaluation(model, tokenizer, settings, args.prompt_style, Path(output) if output else None)
    print(json.dumps(result, indent=2))
    if output:
        print(f"predictions and summary written under {output}", file=sys.stderr)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fura.recipes.artifacts import merge_adapter

    out = merge_adapter(args.adapter, args.output, args.model, args.dtype, args.force, args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fura.io.export import export_lora
    from fura.io.files import check_output_folder
    from fura.io.ownership import check_output_is_not_an_input, locked_output
    from fura.recipes.artifacts import load_for_inference

    check_output_is_not_an_input(args.output, [args.adapter, args.model], "--output")  # even with --force
    check_output_folder(args.output, args.force)  # fail before loading anything
    adapter = Path(args.adapter)
    if (adapter / "adapter" / "adapter_config.json").is_file():
        adapter = adapter / "adapter"
    with locked_output(args.output):
        model, tokenizer, _ = load_for_inference(args.model or adapter, adapter, args.dtype)
        report = export_lora(model, args.rank, args.output, args.adapter_name, force=args.force)
        tokenizer.save_pretrained(args.output)
    print(report.summary())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from fura import FuraConfig
    from fura.recipes.convert import plan_report

    fields = {
        "decomp_mode": args.decomp_mode,
        "rank": args.rank,
        "s_merged_to": args.s_merged_to,
        "input_factorization": args.input_factorization,
        "factorize_by_head": args.factorize_by_head,
    }
    if args.target_modules:
        targets = args.target_modules
        fields["target_modules"] = targets[0] if targets == ["all-linear"] else targets
    config = FuraConfig(**{k: v for k, v in fields.items() if v is not None})
    report = plan_report(args.model, config, args.lora_ranks, args.trust_remote_code)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from fura.recipes.registry import TRACKS, format_methods_table

    if args.track not in TRACKS:
        raise ValueError(f"unknown track {args.track!r}. Fix: use one of {', '.join(TRACKS)}.")
    print(format_methods_table(args.track))
    return 0


def _cmd_stream(args: argparse.Namespace) -> int:
    if args.stream_command == "make-checkpoint":
        import torch

        from fura.apps.synthetic_checkpoint import make_random_checkpoint

        sizes = {
            name: getattr(args, name) for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
        }
        folder = make_random_checkpoint(args.path, **sizes, dtype=getattr(torch, args.dtype), progress=True)
        print(f"random checkpoint written to {folder}")
        return 0
    from fura import FuraConfig
    from fura.io.ownership import staged_output
    from fura.io.streaming.adapter import prepare_adapter
    from fura.io.streaming.qfura import convert_qfura

    progress = not args.no_progress
    with staged_output(args.output_dir, [args.model_dir], args.force, "output_dir") as staging:  # refused, locked
        if args.stream_command == "prepare":
            report = prepare_adapter(args.model_dir, staging, FuraConfig(), device=args.device, progress=progress)
        else:
            report = convert_qfura(args.model_dir, staging, device=args.device, progress=progress)
    report.output_dir = str(args.output_dir)
    if args.report:
        report.save_json(args.report)
    return 0  # the summary was logged by the conversion


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """One console handler at the chosen level; ``fura`` loggers stay at INFO so run folders' ``train.log`` is full."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_fura_cli", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._fura_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    logging.getLogger("fura").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


#: Third-party loggers the CLI silences below ERROR unless -v: {logger: why its warnings are noise here}.
QUIET_LOGGERS = {
    # PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes then tries to fetch an
    # optional kernel from the Hugging Face Hub and warns when it cannot (offline), before falling back to its own.
    "bitsandbytes.backends.cpu.ops": "an optional Hub kernel that is not needed",
}

#: Errors that are the user's (a bad flag, file, setting or adapter): one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,  # a read-only output folder
)
#: ``errno`` values of an ``OSError`` that mean the user's disk, not fura: out of space, quota, read-only file system.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
#: Packages whose ``OSError`` means "this model / tokenizer cannot be found or fetched" (a bad path, an offline Hub id).
LOADER_PACKAGES = ("transformers", "huggingface_hub")
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fura`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = recipe_split(argv)
    command_argv, recipe_argv = (argv, []) if split is None else (argv[:split], argv[split:])
    parser = build_parser(command_argv)
    args, extra = parser.parse_known_args(command_argv)
    if extra and not getattr(args, "accepts_raw_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = recipe_argv if split is not None else extra
    _configure_logging(args.verbose, args.quiet)
    handler = _run_plugin if hasattr(args, "plugin") else args.handler
    try:
        return handler(args)
    except PluginUnavailableError as exc:
        print(f"fura: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"fura: interrupted. {_after_interrupt(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.verbose or not _is_user_error(exc):
            raise
        print(f"fura: error: {_one_line(exc)} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_USAGE


def _after_interrupt(args: argparse.Namespace) -> str:
    if getattr(args, "recipe_argv", False):
        return "Continue from the last checkpoint with the same command plus --resume."
    return "Run the same command again to redo it (merged, exported and streamed folders appear only when complete)."


def _is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's doing: :data:`USER_ERRORS`, fura's own folder errors, a file that is not
    safetensors or a pickle that fails to load, a full disk, or a model that transformers cannot find."""
    import pickle

    from safetensors import SafetensorError

    from fura.io.ownership import FolderInUseError  # imported once a command has run (the library is loaded)
    from fura.recipes.runs import RunFolderError

    if isinstance(exc, (*USER_ERRORS, RunFolderError, FolderInUseError, SafetensorError, pickle.UnpicklingError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in USER_ERRNOS or _raised_in(exc, LOADER_PACKAGES)
    return False


def _raised_in(exc: BaseException, packages: Sequence[str]) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in one of ``packages``."""
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    module = traceback.tb_frame.f_globals.get("__name__", "") if traceback is not None else ""
    return module.split(".", 1)[0] in packages


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
