"""The sequence every training recipe (``fura train sft|grpo|vlm``) runs, which each recipe fills with its parts:
settings → run folder → finished-run check → inputs → model and trainer → train or restore → save → ``results.json``
(:class:`Recipe`). Details: ``docs/recipes/skeleton.md``."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fura.integrations import distributed
from fura.recipes import runs
from fura.recipes.args import (
    RecipeParser,
    automatic_trainer_settings,
    dump_yaml,
    settings_dict,
    unset_defaults,
    warn_slow_bf16,
)
from fura.recipes.loading import MethodInfo
from fura.recipes.registry import MethodSpec, get_method
from fura.recipes.runs import RunFolder

logger = logging.getLogger(__name__)

#: Settings that select the model and the method: no resume may change them.
MODEL_INVARIANTS = ("model", "method", "track", "method_arg", "dtype")
#: Settings that fix the optimizer-step batches: no resume may change them.
BATCH_INVARIANTS = ("seed", "per_device_train_batch_size", "gradient_accumulation_steps")
#: Run switches, not settings: never written to ``config.yaml``.
SWITCHES = ("resume", "overwrite", "print_config")


@dataclass(kw_only=True)
class RecipeSettings:
    """Everything one run of a recipe reads: the parser's argument groups, then ``explicit``.

    Subclasses declare the groups as fields, in the parser's order: ``run`` (model, method and run-folder switches)
    first, the trainer's arguments as ``training``.

    Attributes:
        explicit: names of the fields the user set (YAML or flags); the method's track defaults fill the others.
    """

    #: Inserted between the model and the method in the default run folder name (``"grpo-"`` → ``x-grpo-fura``).
    folder_tag: ClassVar[str] = ""
    explicit: set[str] = dataclasses.field(default_factory=set)
    if TYPE_CHECKING:  # fields of every subclass
        run: Any
        training: Any

    def groups(self) -> list[Any]:
        """The argument groups, in the parser's order."""
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "explicit"]

    def to_dict(self) -> dict[str, Any]:
        """One flat mapping of every setting: what ``config.yaml`` holds (a valid ``--config`` file)."""
        values = settings_dict(*self.groups())
        for switch in SWITCHES:
            values.pop(switch, None)
        return values

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-<folder_tag><method>`` when unset."""
        if "output_dir" in self.explicit and self.training.output_dir:
            return Path(self.training.output_dir)
        return Path("runs") / f"{Path(str(self.run.model)).name}-{self.folder_tag}{self.run.method}"


@dataclass
class RunResult:
    """Outcome of one run of a recipe.

    Attributes:
        run_dir: the run folder.
        method: the method's :class:`~fura.recipes.loading.MethodInfo` (trainable parameters etc.).
        global_step: optimizer steps done (resumed runs included).
        train_loss: mean training loss over this invocation's steps.
        artifact: the saved adapter / dense model folder.
        held_out_loss: loss on the held-out rows at the end (None without held-out rows, and for GRPO).
        reward: GRPO: the mean reward of the last logged step (None otherwise).
        evaluation: the evaluation after training (None when there was none).
        model: the trained model, in eval mode (None for a finished run).
        already_finished: the folder held a finished run, so nothing was trained (``--resume`` of a finished run).
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    artifact: Path
    held_out_loss: float | None = None
    reward: float | None = None
    evaluation: dict[str, Any] | None = None
    model: Any = None
    already_finished: bool = False

    def payload(self, train_metrics: Mapping[str, Any]) -> dict[str, Any]:
        """What ``results.json`` holds (a recipe may add entries)."""
        train = {"global_step": self.global_step, "train_loss": self.train_loss, **train_metrics}
        if self.reward is not None:
            train["last_reward"] = self.reward
        return {
            "method": self.method.to_dict(),
            "train": train,
            "held_out_loss": self.held_out_loss,
            "artifact": str(self.artifact),
            "eval": self.evaluation,
        }

    @classmethod
    def finished(cls, run: RunFolder) -> RunResult:
        """The result recorded in a finished run folder's ``results.json``."""
        payload = json.loads(run.results_path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(MethodInfo)}
        method = {k: v for k, v in payload["method"].items() if k in known}
        return cls(
            run_dir=run.root,
            method=MethodInfo(**method),
            global_step=int(payload["train"]["global_step"]),
            train_loss=payload["train"].get("train_loss"),
            artifact=Path(payload["artifact"]),
            held_out_loss=payload.get("held_out_loss"),
            reward=payload["train"].get("last_reward"),
            evaluation=payload.get("eval"),
            already_finished=True,
        )


@dataclass
class Session:
    """What a recipe built for one run: the trainer and what finishing the run needs.

    Attributes:
        trainer: the ``transformers.Trainer`` (or TRL trainer) to run.
        info: the method's :class:`~fura.recipes.loading.MethodInfo`.
        title: the title of the run's plots.
        save: saves the trained model; returns the artifact folder (called on every process).
        held_out: whether the trainer has held-out rows to score at the end.
        context: whatever the recipe's :meth:`Recipe.after_training` needs (tokenizer, problems, ...).
    """

    trainer: Any
    info: MethodInfo
    title: str
    save: Callable[[], Path]
    held_out: bool = False
    context: dict[str, Any] = dataclasses.field(default_factory=dict)


class Recipe:
    """One training recipe: the parts a recipe fills in (:meth:`build_parser` to :meth:`report`), then the shared
    sequence (:meth:`parse_settings` to :meth:`main`). Subclasses set the class attributes and implement :meth:`start`;
    the other parts have defaults."""

    #: The command (``"fura train sft"``), its description and its example, for ``--help``.
    prog: ClassVar[str]
    description: ClassVar[str]
    epilog: ClassVar[str]
    #: The recipe's settings; the types of its fields are the parser's argument groups.
    settings_cls: ClassVar[type[RecipeSettings]]
    #: Settings a resume cannot change (with the schedule's, :data:`fura.recipes.runs.SCHEDULE_SETTINGS`).
    resume_invariants: ClassVar[tuple[str, ...]]
    #: What those settings keep: "so the resumed run would not continue <keeps>".
    keeps: ClassVar[str] = "the same model and data order"
    #: What one optimizer step is called in messages.
    steps: ClassVar[str] = "steps"

    def build_parser(self) -> RecipeParser:
        """The recipe's parser: one argument group per field of :attr:`settings_cls` (and ``--config``)."""
        hints = typing.get_type_hints(self.settings_cls)
        groups = [hints[f.name] for f in dataclasses.fields(self.settings_cls) if f.name != "explicit"]
        parser = RecipeParser(groups, prog=self.prog, description=self.description, epilog=self.epilog)
        parser.describe_methods()
        return parser

    def make_settings(self, values: Sequence[Any], explicit: set[str], config_file: Path | None) -> RecipeSettings:
        """The recipe's settings from the parsed argument groups."""
        return self.settings_cls(*values, explicit=explicit)

    def check_settings(self, resolved: Any) -> None:
        """Refuse, naming the setting and the fix, what the parser cannot check on its own."""

    def adjust(self, resolved: Any, spec: MethodSpec, changes: dict[str, Any]) -> None:
        """The recipe's own changes: to the trainer's arguments into ``changes``, to its other settings in place."""

    def replace_training(self, resolved: Any, changes: dict[str, Any]) -> Any:
        """The trainer's arguments with ``changes``."""
        return dataclasses.replace(resolved.training, **changes)

    def check_inputs(self, resolved: Any) -> Any:
        """Read and check the data before the run folder or the model is touched; returned to :meth:`start`."""
        return None

    def input_paths(self, resolved: Any) -> tuple[Any, ...]:
        """The paths the run reads (never written into): the run folder may not be or overlap them."""
        return ()

    def start(
        self, resolved: Any, run: RunFolder, checkpoint: Path | None, inputs: Any, callbacks: Sequence[Any]
    ) -> Session:
        """Load the model and build the trainer (the run folder is claimed and ``config.yaml`` written)."""
        raise NotImplementedError

    def after_training(self, session: Session, resolved: Any, run: RunFolder, result: RunResult) -> dict[str, Any]:
        """Main process, after saving: evaluate (into ``result``); returns extra ``results.json`` entries."""
        return {}

    def report(self, result: RunResult) -> list[str]:
        """The lines ``main`` prints after a run that trained."""
        return [f"trained {result.global_step} steps; run folder: {result.run_dir}; saved: {result.artifact}"]

    def parse_settings(self, argv: Sequence[str]) -> Any:
        """Command-line arguments (``--config`` YAML < flags) → the recipe's settings."""
        parsed = self.build_parser().parse(argv)
        return self.make_settings(parsed.values, parsed.explicit, parsed.config_file)

    def resolve_settings(self, settings: Any) -> Any:
        """A checked copy with the method's track defaults in every unset field of the trainer's arguments, automatic
        mixed precision, the recipe's own changes (:meth:`adjust`) and the run folder."""
        resolved = copy.deepcopy(settings)
        self.check_settings(resolved)
        spec = get_method(resolved.run.method)
        defaults = spec.defaults(resolved.run.track).training  # an unknown track fails here
        changes = unset_defaults(resolved.training, defaults, resolved.explicit)
        changes.update(automatic_trainer_settings(resolved.explicit))
        self.adjust(resolved, spec, changes)
        changes["output_dir"] = str(resolved.run_dir())
        resolved.training = self.replace_training(resolved, changes)
        warn_slow_bf16(resolved.training)
        return resolved

    def run(self, settings: Any, callbacks: Sequence[Any] = ()) -> RunResult:
        """Train (or resume) one run of ``settings`` (:meth:`parse_settings`) and write its run folder, in the order
        of ``docs/recipes/skeleton.md``; ``callbacks`` are extra ``transformers`` callbacks, after the recipe's own."""
        from transformers import set_seed

        resolved = self.resolve_settings(settings)
        run = RunFolder(resolved.run_dir())
        if resolved.run.resume and run.is_finished():
            logger.info("%s holds a finished run: nothing to resume", run.root)
            return RunResult.finished(run)
        inputs = self.check_inputs(resolved)
        paths = self.input_paths(resolved)
        with runs.claim_run_folder(run, resolved.run, *paths) as checkpoint, runs.main_process_log(run.log_path):
            if distributed.is_main_process():
                if checkpoint is not None:  # refuse settings that change the model or the data
                    runs.check_resume_compatible(run, resolved.to_dict(), self.resume_invariants, self.keeps)
                run.write_config(dump_yaml(resolved.to_dict()))
            logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
            set_seed(resolved.training.seed)
            session = self.start(resolved, run, checkpoint, inputs, callbacks)
            return self.finish(session, resolved, run, checkpoint)

    def finish(self, session: Session, resolved: Any, run: RunFolder, checkpoint: Path | None) -> RunResult:
        """Train or restore, score the held-out rows, save, evaluate, and write ``results.json`` (last)."""
        trainer = session.trainer
        distributed.configure_trainer_for_fsdp(trainer)
        global_step, train_loss, train_metrics = runs.train_or_restore(trainer, checkpoint)
        held_out = trainer.evaluate() if session.held_out else {}  # also an eval line of metrics.jsonl
        artifact = session.save()
        result = RunResult(run.root, session.info, global_step, train_loss, artifact, held_out.get("eval_loss"))
        if distributed.is_main_process():
            extra = self.after_training(session, resolved, run, result)
            run.plot(session.title)  # after the final evaluation, so that the plot shows it
            run.write_json(run.results_path, {**result.payload(train_metrics), **extra})  # last: the run is done
        logger.info("done: %d steps, artifact %s", global_step, artifact)
        result.model = trainer.model.eval()
        return result

    def main(self, argv: Sequence[str]) -> int:
        """Entry point of the recipe's command; returns the exit status."""
        settings = self.parse_settings(argv)
        if settings.run.print_config:
            print(dump_yaml(self.resolve_settings(settings).to_dict()), end="")
            return 0
        result = self.run(settings)
        print(result.method.summary())
        if result.already_finished:
            print(f"{result.run_dir} holds a finished run ({result.global_step} {self.steps}): nothing to resume")
            return 0
        for line in self.report(result):
            print(line)
        return 0


def method_title(info: MethodInfo, model: str) -> str:
    """The title of a run's loss plot: the method, the model folder and the trainable parameters."""
    return f"{info.method} on {Path(str(model)).name} ({info.trainable_params:,} trainable)"
