"""LLaVA visual instruction data: conversation rendering, label masking, image tokens, a padding collator.

Details: ``docs/recipes/data.md``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fura.recipes.data.formats import DataFormatError, load_rows
from fura.recipes.data.sft import IGNORE_INDEX, SFTCollator, train_val_split

logger = logging.getLogger(__name__)

Template = Literal["vicuna_v1", "chat"]
AspectRatio = Literal["pad", "crop"]
TEMPLATES: tuple[str, ...] = get_args(Template)
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
IMAGE_PLACEHOLDER = "<image>"
#: LLaVA's ``conv_vicuna_v1`` system prompt.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class LlavaDataConfig:
    """LLaVA-format training data and how to render it (``fura train vlm`` flags of the same names; the fields in
    full: ``docs/recipes/data.md``)."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={"help": "LLaVA-format JSON / JSONL files", "aliases": ["--data"], "metavar": "JSON"},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "folder the rows' image paths are under", "metavar": "DIR"}
    )
    template: Template = field(default="vicuna_v1", metadata={"help": "conversation template (vicuna_v1: LLaVA-1.5)"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system text (default: the template's; '' = none)"}
    )
    max_seq_len: int = field(default=2048, metadata={"help": "tokens per row after image expansion"})
    image_aspect_ratio: AspectRatio = field(default="pad", metadata={"help": "pad to a square first, or only crop"})
    val_set_size: int = field(default=0, metadata={"help": "rows held out for a held-out loss"})
    max_rows: int | None = field(default=None, metadata={"help": "seeded random subset of the rows (default: all)"})
    check_images: bool = field(default=True, metadata={"help": "check that the image files exist before training"})

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):  # a single file in a YAML config
            self.train_files = [self.train_files]
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}. Fix: e.g. --max_seq_len 2048.")
        if self.val_set_size < 0:
            raise ValueError(f"val_set_size must be 0 or more, got {self.val_set_size}")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"max_rows must be positive (or unset for all rows), got {self.max_rows}")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation.

    Attributes:
        role: ``"user"`` or ``"assistant"``.
        text: the message, without any ``<image>`` placeholder.
    """

    role: str
    text: str


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered to text, with the character spans the loss covers.

    Attributes:
        text: the full text, ``<image>`` placeholders included (not yet expanded).
        spans: ``[start, end)`` character spans of the assistant answers (the trained text).
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) itself.
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool


def parse_turns(row: Mapping[str, Any], where: str = "") -> list[Turn]:
    """The row's conversation as alternating user / assistant turns, placeholders removed.

    As LLaVA: a leading non-user turn is dropped; a trailing user turn (no answer) is dropped too. Raises
    :class:`DataFormatError` naming the row when the structure is wrong.
    """
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for index, message in enumerate(conversations):
        if not isinstance(message, Mapping) or _ROLES.get(str(message.get("from"))) is None:
            raise DataFormatError(f"{where}: conversations[{index}] needs 'from' in human/gpt and a 'value'")
        value = message.get("value")
        if not isinstance(value, str):
            raise DataFormatError(f"{where}: conversations[{index}]['value'] must be a string")
        turns.append(Turn(_ROLES[message["from"]], value.replace(IMAGE_PLACEHOLDER, "").strip()))
    if turns[0].role != "user":
        turns = turns[1:]
    if turns and turns[-1].role == "user":
        turns = turns[:-1]
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or [t.role for t in turns] != expected:
        raise DataFormatError(f"{where}: turns must alternate human, gpt, human, gpt, ... with at least one answer")
    return turns


def load_llava_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read and validate LLaVA-format rows from local JSON / JSONL files (``id`` defaults to ``file:index``)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LLaVA data file {path} does not exist. Fix: --data PATH of a JSON / JSONL file.")
        for index, row in enumerate(load_rows(path)):
            where = f"{path} row {index} (id {row.get('id', '?')})"
            parse_turns(row, where)
            image = row.get("image")
            if image is not None and not isinstance(image, str):
                raise DataFormatError(f"{where}: 'image' must be one relative path (multi-image rows: not supported)")
            rows.append({**row, "id": str(row.get("id", f"{Path(path).name}:{index}"))})
    logger.info("loaded %d rows (%d with an image)", len(rows), sum(r.get("image") is not None for r in rows))
    return rows


def check_image_files(rows: Sequence[Mapping[str, Any]], image_folder: str | Path | None) -> None:
    """Raise ``FileNotFoundError`` listing (up to 5) rows whose image file is missing."""
    with_image = [r for r in rows if r.get("image") is not None]
    if with_image and image_folder is None:
        raise ValueError("rows reference images but no image folder is set. Fix: --image-folder DIR.")
    progress = tqdm(with_image, desc="check images", disable=len(with_image) < 1000)
    missing = [r for r in progress if not (Path(image_folder) / r["image"]).is_file()]
    if missing:
        examples = ", ".join(f"{r['id']}: {r['image']}" for r in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} image file(s) missing under {image_folder}, e.g. {examples}. Fix: point --image-folder "
            "at the folder the rows' image paths are relative to."
        )


def render_vicuna(turns: Sequence[Turn], has_image: bool, eos: str, system: str | None = None) -> Rendered:
    """LLaVA's ``conv_vicuna_v1`` (sep ``" "``, sep2 = EOS); the answers' leading space and EOS are trained."""
    system = VICUNA_SYSTEM if system is None else system
    text = f"{system} " if system else ""
    spans = []
    for index in range(0, len(turns), 2):
        question = _with_image(turns[index].text) if has_image and index == 0 else turns[index].text
        text += f"USER: {question} ASSISTANT:"
        start = len(text)
        text += f" {turns[index + 1].text}{eos}"
        spans.append((start, len(text)))
    return Rendered(text, tuple(spans), add_special_tokens=True)


def render_chat(
    turns: Sequence[Turn], has_image: bool, apply_template: Callable[..., str], structured: bool, system: str | None
) -> Rendered:
    """Render ``turns`` with ``apply_template`` (``(messages, *, add_generation_prompt) -> text``); each answer span is
    what the template adds after the generation prompt. ``has_image``: the image (part or placeholder) starts the first
    user turn; ``structured``: content as a list of ``{"type": ...}`` parts (processor templates) instead of a string;
    ``system``: a system message first (None or empty: none)."""
    messages = [_message("system", system, False, structured)] if system else []
    text, spans = "", []
    for index, turn in enumerate(turns):
        if turn.role == "assistant":
            prompt = apply_template(messages, add_generation_prompt=True)
            full = apply_template(
                [*messages, _message("assistant", turn.text, False, structured)], add_generation_prompt=False
            )
            if not (prompt.startswith(text) and full.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix (an earlier turn changes "
                    "when a later one is added), so the answer spans cannot be located. Fix: use template "
                    "'vicuna_v1'."
                )
            spans.append((len(prompt), len(full)))
            text = full
        messages.append(_message(turn.role, turn.text, has_image and index == 0, structured))
    return Rendered(text, tuple(spans), add_special_tokens=False)


def _with_image(text: str) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{text}"


def _message(role: str, text: str, image: bool, structured: bool) -> dict[str, Any]:
    if not structured:
        return {"role": role, "content": _with_image(text) if image else text}
    parts: list[dict[str, Any]] = [{"type": "image"}] if image else []
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def expand_to_square(image: Any, background: tuple[int, int, int]) -> Any:
    """LLaVA's ``expand2square``: paste the image centred on a square canvas of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's ``image_mean`` as an RGB 0-255 colour (LLaVA's padding colour)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(255 * float(m)) for m in mean)  # type: ignore[return-value]


def trained_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: whether its first character lies in one of ``spans`` (zero-width special tokens never do)."""
    return [end > start and any(s <= start < e for s, e in spans) for start, end in offsets]


def shift_spans(
    spans: Sequence[tuple[int, int]], input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], image_id: int
) -> list[tuple[int, int]]:
    """Move spans that follow the ``<image>`` placeholder by the length its expansion added to the text."""
    image_offsets = [o for i, o in zip(input_ids, offsets, strict=True) if i == image_id]
    if not image_offsets:
        return list(spans)
    first, last = image_offsets[0][0], image_offsets[-1][1]
    delta = (last - first) - len(IMAGE_PLACEHOLDER)
    return [(s + delta, e + delta) if s >= first else (s, e) for s, e in spans]


@dataclass
class LlavaEncoder:
    """Turns a LLaVA row into ``{"input_ids", "labels"[, "pixel_values"]}`` with a ``transformers`` processor.

    Attributes:
        processor: a LLaVA processor (tokenizer + image processor; expands ``<image>`` to the visual tokens).
        config: rendering and truncation settings.
        image_folder: folder of the rows' image paths.
    """

    processor: Any
    config: LlavaDataConfig
    image_folder: Path | None = None

    def __post_init__(self) -> None:
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if not getattr(self.tokenizer, "is_fast", True):
            raise ValueError("the LLaVA data pipeline needs a fast tokenizer (it reads the offset mapping)")
        self.image_token_id = int(self.processor.image_token_id)
        self._apply_template, self._structured = (
            self._chat_template() if self.config.template == "chat" else (None, False)
        )

    def _chat_template(self) -> tuple[Callable[..., str], bool]:
        """``(apply_chat_template, structured)``: the processor's, with structured content, else the tokenizer's."""
        for owner, structured in ((self.processor, True), (self.tokenizer, False)):
            if getattr(owner, "chat_template", None):
                return functools.partial(owner.apply_chat_template, tokenize=False), structured
        raise ValueError("template 'chat' needs a chat template on the processor or tokenizer. Fix: use 'vicuna_v1'.")

    def render(self, row: Mapping[str, Any]) -> Rendered:
        """The row's conversation as text with its answer spans."""
        turns = parse_turns(row, f"row {row.get('id', '?')}")
        has_image = row.get("image") is not None
        if self.config.template == "vicuna_v1":
            return render_vicuna(turns, has_image, self.tokenizer.eos_token or "", self.config.system_prompt)
        return render_chat(turns, has_image, self._apply_template, self._structured, self.config.system_prompt)

    def load_image(self, row: Mapping[str, Any]) -> Any:
        """The row's image as RGB (padded to a square with ``image_aspect_ratio="pad"``), or None."""
        if row.get("image") is None:
            return None
        if self.image_folder is None:
            raise ValueError(f"row {row.get('id')} has an image but no image folder is set (flag --image-folder)")
        with Image.open(self.image_folder / row["image"]) as handle:
            image = handle.convert("RGB")
        if self.config.image_aspect_ratio == "pad":
            image = expand_to_square(image, mean_colour(self.processor.image_processor))
        return image

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Encode one row (see the class docstring); raises ``ValueError`` if truncation would cut the image."""
        rendered, image = self.render(row), self.load_image(row)
        encoded = self.processor(
            text=[rendered.text],
            images=[image] if image is not None else None,
            add_special_tokens=rendered.add_special_tokens,
            return_offsets_mapping=True,
        )
        input_ids, offsets = list(encoded["input_ids"][0]), [tuple(o) for o in encoded["offset_mapping"][0]]
        spans = shift_spans(rendered.spans, input_ids, offsets, self.image_token_id)
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(input_ids, trained_mask(offsets, spans), strict=True)]
        item = self._truncate(row, input_ids, labels)
        if image is not None:
            item["pixel_values"] = torch.as_tensor(np.asarray(encoded["pixel_values"][0]))
        return item

    def _truncate(self, row: Mapping[str, Any], input_ids: list[int], labels: list[int]) -> dict[str, Any]:
        limit = self.config.max_seq_len
        if len(input_ids) > limit and self.image_token_id in input_ids[limit:]:
            raise ValueError(
                f"row {row.get('id')}: max_seq_len={limit} would cut into the image tokens "
                f"(the sequence has {len(input_ids)} tokens). Fix: raise --max-seq-len."
            )
        return {"input_ids": input_ids[:limit], "labels": labels[:limit]}


class LlavaDataset(torch.utils.data.Dataset):
    """Rows encoded lazily (image loading + processing in ``__getitem__``, so DataLoader workers do it)."""

    def __init__(self, rows: Sequence[dict[str, Any]], encoder: LlavaEncoder) -> None:
        self.rows = list(rows)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encoder(self.rows[index])


class LlavaCollator(SFTCollator):
    """:class:`~fura.recipes.data.sft.SFTCollator` for the token fields, plus the stacked images of the rows that have
    one (:meth:`~fura.recipes.data.sft.SFTCollator.for_tokenizer` builds it).

    Text-only rows contribute no ``pixel_values``; a batch without images has no ``pixel_values`` key (the model
    then runs text-only, as LLaVA's text-only rows, whose image is never used).
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Collate ``features`` (dicts from :class:`LlavaDataset`)."""
        batch = super().__call__(features)  # type: ignore[arg-type]
        images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


@dataclass
class LlavaDatasets:
    """Training and held-out datasets with their collator.

    Attributes:
        train: the training rows, encoded lazily.
        val: the held-out rows (None when ``val_set_size`` is 0).
        collator: a :class:`LlavaCollator` for the tokenizer.
        encoder: the row encoder (to encode prompts the same way elsewhere).
    """

    train: LlavaDataset
    val: LlavaDataset | None
    collator: LlavaCollator
    encoder: LlavaEncoder


def load_llava_data(config: LlavaDataConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``(train, held-out)`` rows of ``config``: read, checked, subset and split (``seed``), images checked (no
    processor needed)."""
    if not config.train_files:
        raise ValueError("no training data: set train_files (flag --data FILE ...)")
    rows = load_llava_rows(config.train_files)
    if not rows:
        raise ValueError(
            f"the training data {list(config.train_files)} holds no rows. Fix: point --data at LLaVA files with rows."
        )
    if config.max_rows is not None and len(rows) > config.max_rows:  # a seeded random subset, in file order
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: config.max_rows].sort()
        rows = [rows[i] for i in keep.values.tolist()]
    if config.check_images:
        check_image_files(rows, config.image_folder)
    return train_val_split(rows, config.val_set_size, seed)


def build_llava_datasets(
    config: LlavaDataConfig,
    processor: Any,
    seed: int,
    rows: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
) -> LlavaDatasets:
    """The datasets of ``config`` (``rows`` from :func:`load_llava_data`, loaded here when None); encoding is lazy."""
    train_rows, val_rows = rows if rows is not None else load_llava_data(config, seed)
    folder = Path(config.image_folder) if config.image_folder else None
    encoder = LlavaEncoder(processor, config, folder)
    collator = LlavaCollator.for_tokenizer(encoder.tokenizer)
    val = LlavaDataset(val_rows, encoder) if val_rows else None
    logger.info(
        "LLaVA data: %d training rows, %d held out, template %s", len(train_rows), len(val_rows), config.template
    )
    return LlavaDatasets(LlavaDataset(train_rows, encoder), val, collator, encoder)
