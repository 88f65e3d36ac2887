"""Training pipelines and the run-folder conventions they share.

* :mod:`fura.train.config` — run configurations (dataclasses), YAML + flag overrides (:func:`build_config`).
* :mod:`fura.train.runs` — run folders: layout, metrics JSONL, loss plot, checkpoint discovery, atomic folders.
* :mod:`fura.train.callbacks` — :class:`RunFolderCallback` for any ``transformers`` / TRL trainer.
* :mod:`fura.train.artifacts` — save adapters / dense models, load for inference, merge adapters.
* :mod:`fura.train.evaluation` — evaluation after training (:mod:`fura.eval` harnesses).
* :mod:`fura.train.cli_args` — flags shared by the ``fura train ...`` commands.
* :mod:`fura.train.sft` — commonsense / instruction SFT (``fura train sft``).
* :mod:`fura.train.convert` — FuRA block plans and parameter counts on the meta device (``fura convert``).

The GRPO (``fura.train.grpo``) and VLM (``fura.train.vlm``) pipelines plug into the CLI by defining
``add_arguments(parser)`` (optional) and ``main(args) -> int``.

Submodules are imported on demand (``transformers.Trainer`` is slow to import).
"""
