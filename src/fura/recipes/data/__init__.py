"""Data loading, prompt formatting and SFT data for the fura recipes.

* :mod:`fura.recipes.data.formats` — LLM-Adapters JSON / JSONL rows (or a Hub dataset id) → ``Example``.
* :mod:`fura.recipes.data.prompts` — the prompt templates and the ``prompt_style`` decision (see its docstring).
* :mod:`fura.recipes.data.sft` — prompt–completion rows for TRL's SFTTrainer, held-out split, file mixing.
* :mod:`fura.recipes.data.math_problems` — GRPO's training and held-out math problems; ``llava`` — LLaVA data.
"""
