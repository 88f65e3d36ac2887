"""LLaVA data: rendering, answer-only labels, image-token expansion, padding collator; plus the tiny offline LLaVA.

Everything is built offline: the byte-level BPE tokenizer of ``conftest.py`` with an added ``<image>`` token, a
``CLIPImageProcessor`` at 32×32 and a ``LlavaProcessor`` with patch size 8 (16 image tokens per image), random PIL
images and a LLaVA-format JSON file. :func:`save_tiny_llava` and :func:`write_llava_data` are reused by
``tests/recipes/test_vlm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fura.recipes.data.formats import DataFormatError
from fura.recipes.data.llava import (
    VICUNA_SYSTEM,
    LlavaCollator,
    LlavaDataConfig,
    LlavaEncoder,
    build_llava_datasets,
    expand_to_square,
    load_llava_data,
    parse_turns,
)
from fura.recipes.data.sft import IGNORE_INDEX

from .conftest import CHAT_TEMPLATE, build_tokenizer

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLS dropped by the "default" feature strategy
STRUCTURED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% for part in m['content'] %}{% if part['type'] == 'image' %}"
    "<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROWS = [
    {
        "id": "img-0",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "the answer is true"},
            {"from": "human", "value": "And the colour?"},
            {"from": "gpt", "value": "solution1 ending2"},
        ],
    },
    {
        "id": "text-1",
        "conversations": [
            {"from": "human", "value": "Please answer the question"},
            {"from": "gpt", "value": "option1"},
        ],
    },
    {
        "id": "img-2",
        "image": "sub/b.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "answer3 answer4"},
        ],
    },
    {
        "id": "img-3",
        "image": "c.png",
        "conversations": [{"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "ending4"}],
    },
]
IMAGES = {"a.png": (40, 24), "sub/b.png": (32, 32), "c.png": (20, 50)}  # (width, height)


# ----------------------------------------------------------------------------------------------------------------
# Builders (shared with tests/recipes/test_vlm.py)
# ----------------------------------------------------------------------------------------------------------------


def build_processor(chat_template: str | None = None):
    """A LlavaProcessor over the offline BPE tokenizer + ``<image>`` and a 32×32 CLIP image processor."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def tiny_llava(processor):
    """A random LLaVA: CLIP vision (32 px, patch 8, hidden 32, 2 layers) + Llama (hidden 32, 2 layers), seeded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def save_tiny_llava(folder: Path) -> Path:
    """Save the tiny LLaVA and its processor to ``folder``."""
    processor = build_processor()
    tiny_llava(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_llava_data(folder: Path, rows: list[dict] = ROWS) -> tuple[Path, Path]:
    """Random RGB images + ``data.json`` under ``folder``; returns ``(json_path, image_folder)``."""
    from PIL import Image

    images = folder / "images"
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGES.items():
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    data = folder / "data.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    return data, images


@pytest.fixture(scope="session")
def processor():
    return build_processor()


@pytest.fixture(scope="session")
def llava_data(tmp_path_factory):
    """``(json_path, image_folder)`` of the four rows above."""
    return write_llava_data(tmp_path_factory.mktemp("llava-data"))


def encoder_for(processor, llava_data, **settings) -> LlavaEncoder:
    data, images = llava_data
    return LlavaEncoder(
        processor, LlavaDataConfig(train_files=[str(data)], image_folder=str(images), **settings), images
    )


def trained_text(tokenizer, item) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(item["input_ids"], item["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_vicuna_labels_cover_only_the_answers(processor, llava_data) -> None:
    encoder = encoder_for(processor, llava_data)
    rendered = encoder.render(ROWS[0])
    assert rendered.text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: the answer is true</s>"
        "USER: And the colour? ASSISTANT: solution1 ending2</s>"
    )
    item = encoder(ROWS[0])
    assert item["input_ids"][0] == processor.tokenizer.bos_token_id and item["labels"][0] == IGNORE_INDEX
    assert trained_text(processor.tokenizer, item) == [" the answer is true</s>", " solution1 ending2</s>"]
    pairs = zip(item["input_ids"], item["labels"], strict=True)
    masked = processor.tokenizer.decode([t for t, label in pairs if label == IGNORE_INDEX])
    assert "USER: And the colour? ASSISTANT:" in masked and VICUNA_SYSTEM in masked


def test_image_tokens_are_expanded_and_masked(processor, llava_data) -> None:
    item = encoder_for(processor, llava_data)(ROWS[0])
    image_id = processor.image_token_id
    positions = [i for i, t in enumerate(item["input_ids"]) if t == image_id]
    assert len(positions) == IMAGE_TOKENS and positions == list(range(positions[0], positions[0] + IMAGE_TOKENS))
    assert all(item["labels"][i] == IGNORE_INDEX for i in positions)
    assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["pixel_values"].dtype == torch.float32

    text_only = encoder_for(processor, llava_data)(ROWS[1])
    assert "pixel_values" not in text_only and image_id not in text_only["input_ids"]
    assert trained_text(processor.tokenizer, text_only) == [" option1</s>"]


def test_chat_templates_processor_and_tokenizer(llava_data) -> None:
    structured = build_processor(chat_template=STRUCTURED_TEMPLATE)
    encoder = encoder_for(structured, llava_data, template="chat")
    assert encoder.render(ROWS[2]).text == "<|user|>\n<image>Describe it.</s>\n<|assistant|>\nanswer3 answer4</s>\n"
    item = encoder(ROWS[2])
    assert item["input_ids"].count(structured.image_token_id) == IMAGE_TOKENS
    assert trained_text(structured.tokenizer, item) == ["answer3 answer4</s>\n"]

    plain = build_processor()
    plain.tokenizer.chat_template = CHAT_TEMPLATE
    encoder = encoder_for(plain, llava_data, template="chat", system_prompt="Be brief.")
    assert encoder.render(ROWS[0]).text.startswith("<|system|>\nBe brief.</s>\n<|user|>\n<image>\nWhat is shown?")
    assert trained_text(plain.tokenizer, encoder(ROWS[0])) == ["the answer is true</s>\n", "solution1 ending2</s>\n"]


def test_collator_pads_and_stacks_only_real_images(processor, llava_data) -> None:
    encoder = encoder_for(processor, llava_data)
    features = [encoder(ROWS[1]), encoder(ROWS[0]), encoder(ROWS[3])]
    batch = LlavaCollator.for_tokenizer(processor.tokenizer)(features)
    width = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    short = len(features[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == short and (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert "pixel_values" not in LlavaCollator.for_tokenizer(processor.tokenizer)([features[0]])


def test_pad_to_square_uses_the_mean_colour(processor) -> None:
    from PIL import Image

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 0, 0)


def test_truncation_never_cuts_the_image(processor, llava_data) -> None:
    full = encoder_for(processor, llava_data)(ROWS[0])
    image_end = max(i for i, t in enumerate(full["input_ids"]) if t == processor.image_token_id) + 1
    with pytest.raises(ValueError, match="cut into the image tokens"):
        encoder_for(processor, llava_data, max_seq_len=image_end - 1)(ROWS[0])
    item = encoder_for(processor, llava_data, max_seq_len=image_end + 3)(ROWS[0])
    assert item["input_ids"] == full["input_ids"][: image_end + 3] and item["labels"] == full["labels"][: image_end + 3]


def test_datasets_split_and_bad_rows(processor, llava_data, tmp_path) -> None:
    data, images = llava_data
    config = LlavaDataConfig(train_files=[str(data)], image_folder=str(images), val_set_size=1)
    datasets = build_llava_datasets(config, processor, seed=42)
    assert len(datasets.train) == 3 and len(datasets.val) == 1

    assert [t.role for t in parse_turns({"conversations": [{"from": "gpt", "value": "x"}, *ROWS[1]["conversations"]]})]\
        == ["user", "assistant"]  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(DataFormatError, match=r"bad\.json row 0"):
        build_llava_datasets(LlavaDataConfig(train_files=[str(bad)]), processor, seed=42)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{**ROWS[3], "image": "nope.png"}]))
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        build_llava_datasets(LlavaDataConfig(train_files=[str(missing)], image_folder=str(images)), processor, 42)


def test_data_is_checked_without_a_processor(llava_data, tmp_path) -> None:
    data, images = llava_data
    train, val = load_llava_data(LlavaDataConfig(train_files=[str(data)], image_folder=str(images), val_set_size=1), 7)
    assert len(train) == 3 and len(val) == 1
    again = load_llava_data(LlavaDataConfig(train_files=[str(data)], image_folder=str(images), val_set_size=1), 7)
    assert (train, val) == again  # seeded
    subset, _ = load_llava_data(LlavaDataConfig(train_files=[str(data)], image_folder=str(images), max_rows=2), 7)
    assert len(subset) == 2
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json'\] holds no rows\. Fix"):
        load_llava_data(LlavaDataConfig(train_files=[str(empty)]), 7)
    with pytest.raises(FileNotFoundError, match=r"nothing\.json does not exist\. Fix: --data"):
        load_llava_data(LlavaDataConfig(train_files=[str(tmp_path / "nothing.json")]), 7)
    with pytest.raises(ValueError, match="no training data"):
        load_llava_data(LlavaDataConfig(), 7)
    with pytest.raises(ValueError, match=r"no image folder is set\. Fix: --image-folder"):
        load_llava_data(LlavaDataConfig(train_files=[str(data)]), 7)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"template": "llama"}, "template must be one of"),
        ({"image_aspect_ratio": "stretch"}, "image_aspect_ratio must be one of"),
        ({"max_seq_len": 0}, "max_seq_len must be positive"),
        ({"val_set_size": -1}, "val_set_size must be 0 or more"),
        ({"max_rows": 0}, "max_rows must be positive"),
    ],
)
def test_config_refuses_bad_values(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        LlavaDataConfig(train_files=["a.json"], **settings)
    assert LlavaDataConfig(train_files="a.json").train_files == ["a.json"]  # a single file from a YAML config
