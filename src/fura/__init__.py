"""fura — FuRA (Full-Rank Adaptation) as a PEFT method.

``import fura`` registers the method with PEFT, so the usual PEFT / transformers / TRL entry
points (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``model.load_adapter``, ``SFTTrainer(peft_config=...)``) accept :class:`FuraConfig`.
"""

from fura._registration import is_registered, register
from fura.config import FuraConfig
from fura.factorize import BlockPlan, HeadInfo, closest_factor_pair, make_plan
from fura.layer import FuraBaseMismatchError, FuraLayer, FuraLinear, FuraWeightsMissingError
from fura.model import FuraModel

register()

__version__ = "0.1.0"

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
