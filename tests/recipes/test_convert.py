"""``fura convert``'s plan report (built on the meta device from a config)."""

from __future__ import annotations

import transformers as tr

from fura.recipes.convert import plan_report


def test_plan_shows_head_aligned_attention_output(tmp_path):
    """GPT-NeoX names its attention output ``dense``: the plan splits it by head (2 x 48) and says so."""
    config = tr.GPTNeoXConfig(
        vocab_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(tmp_path)
    report = plan_report(str(tmp_path))
    splits = {group.leaf: (group.split, group.plan.in_blocks, group.plan.in_block_size) for group in report.groups}
    assert splits["dense"] == ("head", 2, 48)
    assert splits["dense_4h_to_h"][0] == "-"
    assert splits["query_key_value"][0] == "-"  # its input (the hidden state) is not heads
    row = next(line for line in report.format().splitlines() if line.startswith("dense "))
    assert "head" in row.split()


def test_plan_names_expert_stacks_and_counts_lora_per_expert(tmp_path):
    config = tr.MixtralConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    config.save_pretrained(tmp_path)
    report = plan_report(str(tmp_path), lora_ranks=(8,))
    groups = {group.leaf: group for group in report.groups}
    assert {"gate_up_proj", "down_proj"} <= set(groups)
    down = groups["down_proj"]
    assert (down.experts, down.plan.out_features, down.plan.in_features) == (4, 64, 96)
    assert down.lora(8) == 4 * 8 * (64 + 96)  # PEFT's LoRA ParamWrapper: rank r per expert
    assert down.trainable_per_module == 4 * 96 * (down.plan.rank + 1)  # every expert's core and singular values
    assert "4x 64 x 96" in report.format()
