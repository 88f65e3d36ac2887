"""Where FuRA's transform should act on a mixture of experts: on each expert's input, or on each expert's weight.

FuRA adapts expert ``e`` as ``W_e' = W_e · blockdiag(I + Δ_e)``. Two ways compute the same layer:

* **input form** — inside the expert loop, ``x_e ← x_e + blockdiag(Δ_e) x_e`` for the tokens routed to ``e``, then the
  untouched ``W_e`` (``O(tokens·top_k·in·d)`` extra work, but it needs its own expert loop);
* **weight form** — ``W_e'`` for every expert once per forward, then the model's own experts implementation
  (``O(E·out·in·d)`` extra work, amortised over all tokens routed to ``e``; what :mod:`fura.tuner.experts` does).

This script times one training step (forward + backward) of a Mixtral-style experts block for both forms and the
untouched base, and checks that the two forms agree. Run::

    OMP_NUM_THREADS=1 python benchmarks/moe_transform.py

Measured on the 2-core CPU of the development machine (one thread; E=8 experts, top-2, hidden 256, intermediate 512,
float32, median of 5 steps, ms per forward + backward of the experts block; "base" also computes the dense weight
gradients, so it is not the floor)::

    tokens                                1024     4096
    base, grouped_mm                     107.5    348.2
    FuRA weight form, grouped_mm         141.4    322.2
    base, eager                          113.9    292.3
    FuRA weight form, eager              187.7    291.0
    FuRA input form, expert loop         100.8    262.6

The input form is faster here (1.4x at 1024 tokens, 1.1x at 4096: the weight form's extra work ``E·out·in·d`` is
fixed per step while the input form's grows with the tokens) and keeps no adapted copy of the stack for backward; the
weight form works unchanged with every experts implementation and layout. See :mod:`fura.tuner.experts` for the choice.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from peft import get_peft_model

import fura
from fura.tuner.experts import ParamWrapper
from fura.tuner.layer import apply_block_transform


def build(implementation: str, hidden: int, intermediate: int, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def input_form(experts_module, wrappers, hidden_states, top_k_index, top_k_weights):
    """The expert loop with the transform applied to each expert's input (gate_up and down)."""
    gate_up, down = wrappers["gate_up_proj"], wrappers["down_proj"]
    factors = {name: w._row_factors("default", hidden_states.dtype) for name, w in wrappers.items()}
    out = torch.zeros_like(hidden_states)
    num = gate_up.num_experts
    mask = F.one_hot(top_k_index, num_classes=num).permute(2, 1, 0)
    for expert in range(num):
        position, tokens = torch.where(mask[expert])
        if tokens.numel() == 0:
            continue
        x = hidden_states[tokens]
        k_gu = factors["gate_up_proj"][0].shape[0] // num
        left, right = factors["gate_up_proj"]
        x = apply_block_transform(
            x, left[expert * k_gu : (expert + 1) * k_gu], right[expert * k_gu : (expert + 1) * k_gu]
        )
        g, u = F.linear(x, gate_up.target_weight()[expert]).chunk(2, dim=-1)
        h = experts_module.act_fn(g) * u
        k_d = factors["down_proj"][0].shape[0] // num
        left, right = factors["down_proj"]
        h = apply_block_transform(h, left[expert * k_d : (expert + 1) * k_d], right[expert * k_d : (expert + 1) * k_d])
        y = F.linear(h, down.target_weight()[expert]) * top_k_weights[tokens, position, None]
        out = out.index_add(0, tokens, y)
    return out


def time_step(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn().square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main(hidden: int = 256, intermediate: int = 512, experts: int = 8, tokens: int = 1024) -> None:
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden)
    top_k_index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, 2).softmax(-1)
    rows = []
    for implementation in ("grouped_mm", "eager"):
        base = build(implementation, hidden, intermediate, experts)
        block = base.model.layers[0].mlp.experts
        rows.append((f"base, {implementation}", time_step(partial(block, x, top_k_index, top_k_weights))))
        peft_model = get_peft_model(base, fura.FuraConfig(init_weights=False))
        wrapper = peft_model.base_model.model.model.layers[0].mlp.experts
        wrappers = {m.parameter_name: m for m in wrapper.modules() if isinstance(m, ParamWrapper)}
        inner = wrapper.get_base_layer()
        weight_form = time_step(partial(wrapper, x, top_k_index, top_k_weights))
        rows.append((f"FuRA weight form, {implementation}", weight_form))
        if implementation == "eager":
            with torch.no_grad():
                reference = wrapper(x, top_k_index, top_k_weights)
                mine = input_form(inner, wrappers, x, top_k_index, top_k_weights)
            torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)
            rows.append(
                (
                    "FuRA input form, expert loop",
                    time_step(partial(input_form, inner, wrappers, x, top_k_index, top_k_weights)),
                )
            )
    print(f"E={experts}, top-2, hidden {hidden}, intermediate {intermediate}, {tokens} tokens; fwd+bwd ms")
    for name, ms in rows:
        print(f"| {name:<36} | {ms:8.1f} |")


if __name__ == "__main__":
    main()
