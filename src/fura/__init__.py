"""fura — FuRA (Full-Rank Adaptation) as a PEFT method.

``import fura`` registers the method with PEFT, so the usual PEFT / transformers / TRL entry
points (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``model.load_adapter``, ``SFTTrainer(peft_config=...)``) accept :class:`FuraConfig`.
"""

from fura import assets
from fura._registration import is_registered, register
from fura.btt import (
    BlockTTLinear,
    configure_blocktt_trainability,
    convert_linear_to_btt,
    get_blocktt_target_module_names,
    normalize_trainable_blocktt_cores_,
)
from fura.config import FuraConfig
from fura.factorize import BlockPlan, HeadInfo, closest_factor_pair, make_plan
from fura.layer import FuraBaseMismatchError, FuraLayer, FuraLinear, FuraWeightsMissingError
from fura.model import FuraModel
from fura.qbtt import QBlockTTLinear, convert_btt_to_qbtt_, quantize_frozen_core_
from fura.streaming import StreamReport, convert_qfura, load_qfura, prepare_adapter
from fura.svd import SVDLinear, configure_svd_trainability, convert_linear_to_svd

register()

__version__ = "0.1.0"

__all__ = [
    "BlockPlan",
    "BlockTTLinear",
    "FuraBaseMismatchError",
    "FuraConfig",
    "FuraLayer",
    "FuraLinear",
    "FuraModel",
    "FuraWeightsMissingError",
    "HeadInfo",
    "QBlockTTLinear",
    "SVDLinear",
    "StreamReport",
    "assets",
    "closest_factor_pair",
    "configure_blocktt_trainability",
    "configure_svd_trainability",
    "convert_btt_to_qbtt_",
    "convert_linear_to_btt",
    "convert_linear_to_svd",
    "convert_qfura",
    "get_blocktt_target_module_names",
    "is_registered",
    "load_qfura",
    "make_plan",
    "normalize_trainable_blocktt_cores_",
    "prepare_adapter",
    "quantize_frozen_core_",
    "register",
]
