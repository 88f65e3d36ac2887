"""The FuRA PEFT method: what a PEFT pull request would contain.

=================  ==========================================================================================
``config.py``      :class:`FuraConfig` — every knob, validated when the config is built
``layer.py``       :class:`FuraLayer` / :class:`FuraLinear` — the implicit form ``y = base(x + blockdiag(Δ)x)``
``experts.py``     ``ParamWrapper`` — fused MoE expert stacks (``target_parameters``), one decomposition per expert
``conv.py``        ``FuraConv2d`` — output-channel blocks of a convolution
``model.py``       :class:`FuraModel` — PEFT's ``BaseTuner``: targeting, atomic injection, batched SVDs
``factorize.py``   block plans ``(m, n, a, b, r)`` and the batched block SVD / QR
``heads.py``       attention roles of layers (any architecture's names) and head-aligned block splits
``coverage.py``    the share of a model adapters reach, and the warning when much is left out
``counting.py``    PEFT's parameter count without FuRA's frozen bases
``base_weight.py`` read / replace / restore the dense weight of any supported base layer
``registration.py`` ``PeftType.FURA`` and PEFT's registries
=================  ==========================================================================================

Nothing here imports from the rest of ``fura``: the explicit layers, I/O, recipes and the CLI build on it.
"""

from fura.tuner.config import FuraConfig
from fura.tuner.factorize import BlockPlan, HeadInfo, closest_factor_pair, make_plan
from fura.tuner.layer import FuraBaseMismatchError, FuraLayer, FuraLinear, FuraWeightsMissingError
from fura.tuner.model import FuraModel
from fura.tuner.registration import is_registered, register

__all__ = [
    "BlockPlan",
    "FuraBaseMismatchError",
    "FuraConfig",
    "FuraLayer",
    "FuraLinear",
    "FuraModel",
    "FuraWeightsMissingError",
    "HeadInfo",
    "closest_factor_pair",
    "is_registered",
    "make_plan",
    "register",
]
