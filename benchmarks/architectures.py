"""Tiny random models of the architectures people fine-tune, and the README's "Supported architectures" table.

Every entry builds a model from its config alone (offline, seconds, hidden width 32–64, one or two layers) with the
inputs it takes. ``tests/tuner/test_architectures.py`` runs FuRA's guarantees on each (wrap, bit-identical start, a
training step, merge, bit-exact unmerge, save/load, generation, ``merge_and_unload``); this script writes the table of
how much of each model FuRA's default configuration adapts, beside PEFT's LoRA with ``target_modules="all-linear"``::

    OMP_NUM_THREADS=1 python -m benchmarks.architectures            # prints the markdown table
    OMP_NUM_THREADS=1 python -m benchmarks.architectures --readme README.md   # replaces the table in the README

The shares are of the tiny models' parameters, so embeddings weigh more than in full-size models; what they compare
is which layers each method reaches.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 64
TABLE_START = "<!-- architectures-table:start -->"
TABLE_END = "<!-- architectures-table:end -->"


@dataclass(frozen=True)
class Architecture:
    """One tiny architecture.

    Attributes:
        name: the transformers ``model_type`` (or ``unet2d``).
        build: returns a fresh random model (call under a fixed seed for reproducible weights); the causal language
            models take config overrides as keyword arguments (``num_hidden_layers=2``).
        inputs: returns the keyword arguments of one forward pass.
        generates: whether ``generate`` applies (causal and seq2seq language models).
        conv_targets: ``target_modules`` regex naming the model's ``nn.Conv2d`` layers (convolutional models).
    """

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    generates: bool = False
    conv_targets: str | None = None


def _tokens(batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


def _seq2seq() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (2, 4), generator=generator)}


def _pixels(size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, size, size, generator=generator)}


def _causal(config_cls: str, model_cls: str, **values: Any) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls)(**{**values, **overrides})
        return getattr(transformers, model_cls)(config)

    return build


_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
_MOE = dict(num_experts_per_tok=2)


def _llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8
    )
    text = LlamaConfig(**{**_LLAMA_LIKE, "vocab_size": VOCAB + 1})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config)


def _llava_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, VOCAB, (2, 4), generator=generator)
    image = torch.full((2, 4), VOCAB)  # 16 / 8 = 2 x 2 patches
    return {"input_ids": torch.cat([image, text], dim=1), **_pixels(16)}


def _unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def _unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 3, 8, 8, generator=generator), "timestep": torch.tensor([3, 7])}


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    return ResNetForImageClassification(config)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in [
        Architecture("llama", _causal("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), _tokens, True),
        Architecture("mistral", _causal("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE), _tokens, True),
        Architecture("qwen2", _causal("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), _tokens, True),
        Architecture("qwen3", _causal("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=8), _tokens, True),
        Architecture("gemma2", _causal("Gemma2Config", "Gemma2ForCausalLM", **_LLAMA_LIKE, head_dim=8), _tokens, True),
        Architecture(
            "gemma3_text", _causal("Gemma3TextConfig", "Gemma3ForCausalLM", **_LLAMA_LIKE, head_dim=8), _tokens, True
        ),
        Architecture("phi3", _causal("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE, pad_token_id=0), _tokens, True),
        Architecture("olmo", _causal("OlmoConfig", "OlmoForCausalLM", **_LLAMA_LIKE, pad_token_id=0), _tokens, True),
        Architecture("olmo2", _causal("Olmo2Config", "Olmo2ForCausalLM", **_LLAMA_LIKE, pad_token_id=0), _tokens, True),
        Architecture(
            "mixtral",
            _causal("MixtralConfig", "MixtralForCausalLM", **_LLAMA_LIKE, **_MOE, num_local_experts=4),
            _tokens,
            True,
        ),
        Architecture(
            "qwen3_moe",
            _causal(
                "Qwen3MoeConfig",
                "Qwen3MoeForCausalLM",
                **_LLAMA_LIKE,
                **_MOE,
                head_dim=8,
                num_experts=4,
                moe_intermediate_size=24,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "gpt_oss",
            _causal(
                "GptOssConfig",
                "GptOssForCausalLM",
                **{**_LLAMA_LIKE, "max_position_embeddings": 4096},
                **_MOE,
                head_dim=8,
                num_local_experts=4,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "gpt2",
            _causal("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32),
            _tokens,
            True,
        ),
        Architecture(
            "gpt_neox",
            _causal(
                "GPTNeoXConfig",
                "GPTNeoXForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=32,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "falcon",
            _causal(
                "FalconConfig",
                "FalconForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "bloom",
            _causal("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4),
            _tokens,
            True,
        ),
        Architecture(
            "opt",
            _causal(
                "OPTConfig",
                "OPTForCausalLM",
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=32,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "gptj",
            _causal(
                "GPTJConfig",
                "GPTJForCausalLM",
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=1,
                n_head=4,
                rotary_dim=4,
                n_positions=32,
            ),
            _tokens,
            True,
        ),
        Architecture(
            "bert",
            _causal(
                "BertConfig",
                "BertModel",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=32,
            ),
            _tokens,
        ),
        Architecture(
            "roberta",
            _causal(
                "RobertaConfig",
                "RobertaModel",
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=40,
            ),
            _tokens,
        ),
        Architecture(
            "t5",
            _causal(
                "T5Config",
                "T5ForConditionalGeneration",
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
            ),
            _seq2seq,
            True,
        ),
        Architecture(
            "bart",
            _causal(
                "BartConfig",
                "BartForConditionalGeneration",
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=48,
                decoder_ffn_dim=48,
                max_position_embeddings=32,
            ),
            _seq2seq,
            True,
        ),
        Architecture(
            "vit",
            _causal(
                "ViTConfig",
                "ViTModel",
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=16,
                patch_size=8,
            ),
            _pixels,
        ),
        Architecture("llava", _llava, _llava_inputs, True),
        Architecture("unet2d", _unet, _unet_inputs, conv_targets=r".*conv(1|2|_in|_out|_shortcut)?$"),
        Architecture("resnet", _resnet, _pixels, conv_targets=r".*convolution$"),
    ]
}


def main_output(output: Any) -> torch.Tensor:
    """The tensor a model's forward is about: logits, the last hidden state, or a UNet's sample."""
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no logits / last_hidden_state / sample in {type(output).__name__}")


def build(name: str, **overrides: Any) -> nn.Module:
    """A fresh tiny model of ``name`` with seeded random weights, in eval mode (no dropout); ``overrides`` change its
    config (causal language models only, e.g. ``num_hidden_layers=2``)."""
    torch.manual_seed(0)
    return ARCHITECTURES[name].build(**overrides).eval()


def shares(name: str) -> tuple[float, ...]:
    """Share of the base parameters adapted by ``FuraConfig()``, by LoRA ``target_modules="all-linear"`` and (for
    convolutional models) by ``FuraConfig(target_modules=<the Conv2d layers>)``."""
    from peft import LoraConfig, get_peft_model

    import fura
    from fura.tuner.coverage import measure

    results = []
    configs = [fura.FuraConfig(), LoraConfig(target_modules="all-linear")]
    if ARCHITECTURES[name].conv_targets:
        configs.append(fura.FuraConfig(target_modules=ARCHITECTURES[name].conv_targets))
    for config in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                results.append(measure(get_peft_model(build(name), config)).adapted_share)
            except ValueError:
                results.append(float("nan"))
    return tuple(results)


def table() -> str:
    """The markdown table: architecture, share adapted by FuRA's default, by LoRA all-linear."""
    lines = [
        "| architecture | FuRA `FuraConfig()` adapts | LoRA `all-linear` adapts |",
        "|---|---:|---:|",
    ]
    for name in ARCHITECTURES:
        fura_share, lora_share, *conv = shares(name)
        cells = [f"{value:.0%}" if value == value else "refused" for value in (fura_share, lora_share)]
        if conv:
            cells[0] += f" ({conv[0]:.0%} with its Conv2d layers as `target_modules`)"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def replace_table(readme: Path, markdown: str) -> None:
    """Put ``markdown`` between the table markers of ``readme`` (written whole, never half)."""
    text = readme.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {TABLE_START} ... {TABLE_END} markers; add them where the table goes.")
    readme.write_text(pattern.sub(f"{TABLE_START}\n{markdown}\n{TABLE_END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, help="replace the table between the markers of this file")
    args = parser.parse_args(argv)
    markdown = table()
    if args.readme:
        replace_table(args.readme, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
