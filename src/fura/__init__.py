"""fura — FuRA (Full-Rank Adaptation) as a PEFT method.

``import fura`` registers the method with PEFT, so the usual PEFT / transformers / TRL entry
points (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``model.load_adapter``, ``SFTTrainer(peft_config=...)``) accept :class:`FuraConfig`.

The package is layered; each layer imports only the ones below it (checked in CI)::

    fura_cli                      the ``fura`` command line
    fura.apps                     the demo and the benchmark harness
    fura.recipes                  methods registry, data, SFT / GRPO / VLM recipes, evaluation, run folders
    fura.io                       offline assets, safetensors streaming, layer-streaming conversion, LoRA export
    fura.explicit  fura.integrations   reference-style BlockTT / QBlockTT / SVD layers; distributed training
    fura.tuner                    the PEFT method itself: config, layer, model, block factorisation

Importing ``fura`` loads only :mod:`fura.tuner` (torch and PEFT); the names of the other layers
below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from fura import tuner
from fura.tuner import *  # noqa: F403 - the PEFT method's public names are fura's

tuner.register()

__version__ = "0.1.0"

#: Public names of the upper layers, imported when first used (``fura.BlockTTLinear`` …).
_LAZY: dict[str, str] = {
    "BlockTTLinear": "fura.explicit.btt",
    "configure_blocktt_trainability": "fura.explicit.btt",
    "convert_linear_to_btt": "fura.explicit.btt",
    "get_blocktt_target_module_names": "fura.explicit.btt",
    "normalize_trainable_blocktt_cores_": "fura.explicit.btt",
    "QBlockTTLinear": "fura.explicit.qbtt",
    "convert_btt_to_qbtt_": "fura.explicit.qbtt",
    "quantize_frozen_core_": "fura.explicit.qbtt",
    "SVDLinear": "fura.explicit.svd",
    "configure_svd_trainability": "fura.explicit.svd",
    "convert_linear_to_svd": "fura.explicit.svd",
    "StreamReport": "fura.io.streaming.report",
    "convert_qfura": "fura.io.streaming.qfura",
    "load_qfura": "fura.io.streaming.qfura",
    "prepare_adapter": "fura.io.streaming.adapter",
}
#: Submodules reachable as attributes (``fura.assets.smollm2_path()``).
_LAZY_MODULES: dict[str, str] = {"assets": "fura.io.assets"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    else:
        raise AttributeError(f"module 'fura' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


__all__ = [*tuner.__all__, *_LAZY]
