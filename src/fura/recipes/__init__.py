"""Recipes: the paper's experiment tracks built on the library and on TRL / transformers.

``methods.py`` (the one method registry: fura, lora, dora, pissa, full, svd, fura-explicit, qlora, qdora, qfura,
qfura-nf4),
``data/`` (LLM-Adapters, LLaVA and math problem sets), ``eval/`` (commonsense and math harnesses), ``sft.py``,
``grpo.py``, ``vlm.py`` (the training recipes), ``runs.py`` / ``artifacts.py`` / ``callbacks.py`` (run folders,
saved models, the metrics callback).
"""
