"""Explicit layers with the reference code's full semantics (they replace the ``nn.Linear``).

``btt.py`` — :class:`BlockTTLinear`, the reference's ``BTTLayer`` (every decomposition mode including ``square``,
train positions small / large / both, every ``s_merged_to``) and its functional API; ``qbtt.py`` —
:class:`QBlockTTLinear`, the paper's QFuRA with the frozen core stored in NF4 / FP4; ``svd.py`` —
:class:`SVDLinear`, the full-rank SVD reparameterisation baseline. The PEFT adapter in :mod:`fura.tuner` is
the same function as ``BlockTTLinear`` wherever both exist (tested to 1e-10 in float64).
"""
