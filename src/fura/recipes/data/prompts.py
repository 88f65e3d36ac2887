"""Prompt templates, and one deliberate decision about them.

Details: ``docs/recipes/data.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fura.recipes.data.formats import Example

PromptStyle = Literal["fura", "reference", "chat"]
PROMPT_STYLES: tuple[str, ...] = ("fura", "reference", "chat")
Split = Literal["train", "eval"]

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

#: The default template (train and eval): the reference's training template without the literal "<s> ".
FURA_TEMPLATE = _HEADER + "  \n\n### Instruction:\n{instruction}\n" + " " * 16 + "\n### Response:\n"
#: The reference's training template, verbatim.
REFERENCE_TRAIN_TEMPLATE = "<s> " + FURA_TEMPLATE
#: The reference's evaluation template (``i_prompt`` in run_commonsense_parallel.py), verbatim.
REFERENCE_EVAL_TEMPLATE = "<s> " + _HEADER + " \n\n### Instruction:\n{instruction}\n\n### Response:\n"

#: The reference's RL math instruction (``boxed.prompt``), with single backslashes (the reference file had literal
#: double backslashes, the reference's rl/run_rl.py). ``{question}`` is substituted with ``str.replace``.
BOXED_MATH_INSTRUCTION = (
    "Think for a bit about the question and then put your final answer as a number inside \\boxed{}. "
    "(i.e. \\boxed{answer here})\nQuestion: {question}"
)


@dataclass(frozen=True)
class PromptFormatter:
    """Turns an :class:`Example` into prompt text and target text for one ``prompt_style``.

    Attributes:
        style: ``"fura"`` (default), ``"reference"`` or ``"chat"`` (see ``docs/recipes/data.md``).
        tokenizer: the tokenizer; needed for the EOS token of the target and for the chat template.
    """

    style: PromptStyle = "fura"
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.style!r}")
        if self.style == "chat" and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("prompt_style='chat' needs a tokenizer with a chat_template")

    @property
    def add_special_tokens(self) -> bool:
        """Whether to let the tokenizer add its special tokens (BOS) when tokenising prompts of this style."""
        return self.style == "fura"

    def instruction(self, example: Example) -> str:
        """The instruction text of a row, with the ``input`` field handled per style (``docs/recipes/data.md``)."""
        if not example.input:
            return example.instruction
        if self.style == "reference":
            return example.input
        return f"{example.instruction}\n\n{example.input}"

    def prompt(self, instruction: str, split: Split = "train") -> str:
        """The prompt text (what the model sees before its answer) for ``split`` ``"train"`` or ``"eval"``."""
        if self.style == "chat":
            return self._chat([{"role": "user", "content": instruction}], generation_prompt=True)
        if self.style == "reference":
            template = REFERENCE_TRAIN_TEMPLATE if split == "train" else REFERENCE_EVAL_TEMPLATE
            return template.format(instruction=instruction)
        return FURA_TEMPLATE.format(instruction=instruction)

    def target(self, instruction: str, output: str) -> str:
        """The text the labels cover: ``output + " " + eos`` (fura/reference) or the rendered assistant turn (chat)."""
        if self.style != "chat":
            eos = getattr(self.tokenizer, "eos_token", None)
            if eos is None:
                raise ValueError("the tokenizer has no eos_token; the SFT target needs one")
            return f"{output.replace('</s>', '')} {eos}"
        prompt = self.prompt(instruction)
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
        full = self._chat(messages, generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
        return full[len(prompt) :]

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
