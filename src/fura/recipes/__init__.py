"""Recipes: the paper's experiment tracks built on the library and on TRL / transformers.

The methods: ``registry.py`` (the one method registry: fura, lora, dora, pissa, oft, full, svd, fura-explicit, qlora,
qdora, qfura, qfura-nf4, with the reference's values per track), ``method_args.py`` (the arguments of the non-PEFT
methods), ``loading.py`` (load a base model and apply a method), ``base_models.py`` (model paths, dtypes, parameter
counts); ``data/`` (LLM-Adapters, LLaVA and math problem sets), ``eval/`` (commonsense and math harnesses),
``sft.py``, ``grpo.py``, ``vlm.py`` (the training recipes), ``runs.py`` / ``artifacts.py`` / ``callbacks.py`` (run
folders, saved models, the metrics callback).
"""
