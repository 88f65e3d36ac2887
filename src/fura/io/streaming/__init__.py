r"""Layer-streaming conversion: FuRA adapters and QFuRA checkpoints of models too large to load.

A FuRA initialisation is local: the adapter of a weight ``W0: (out, in)`` depends on that weight alone
(``n`` blocks ``W0_j: (out, b)``, thin SVDs ``W0_j = U_j diag(σ_j) V_jᵀ``; stored are ``V: (n, b, r)``,
``σ``, ``s = σ`` and the trained core ``R = Vᵀ``). So the model is never built: its skeleton lives on
the meta device and the weights are read from the checkpoint's safetensors shards one at a time.

* :mod:`.skeleton` — the meta skeleton, the checkpoint's names and dtype, layer groups.
* :mod:`.adapter` — :func:`~.adapter.prepare_adapter`, the PEFT adapter written weight by weight.
* :mod:`.qfura` — :func:`~.qfura.convert_qfura` / :func:`~.qfura.load_qfura`, the explicit NF4 QFuRA model.
* :mod:`.report` — :class:`~.report.StreamReport`, what a conversion cost in time and memory.

``fura stream`` runs them from the command line.
"""
