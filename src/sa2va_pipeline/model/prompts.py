"""Prompt text and chat templates of Sa2VA (the official training/inference forms).

The question list, the answer list and the templates follow the official Sa2VA code (xtuner-style templates):
a turn is ``INSTRUCTION.format(input=...)`` (not trained), then ``answer + SUFFIX`` (trained), then ``SEP``
(not trained). The first human turn is ``"<image>\\n" + question`` where ``<image>`` becomes
``<img>`` + ``<IMG_CONTEXT>`` x 256 per tile + ``</img>``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
SEG_TOKEN = "[SEG]"
IMAGE_PLACEHOLDER = "<image>"
# Tokens Sa2VA adds on top of InternVL's vocabulary.
SA2VA_ADDED_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]

# As in the official code: 16 entries (each form with and without its final punctuation);
# sampled from the list as it is.
SEG_QUESTIONS = [
    "Can you segment the {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
    "Can you segment the {class_name} in this image",
    "Please segment {class_name} in this image",
    "What is {class_name} in this image? Please respond with segmentation mask",
    "What is {class_name} in this image? Please output segmentation mask",
    "Could you provide a segmentation mask for the {class_name} in this image?",
    "Please identify and segment the {class_name} in this image.",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {class_name} in this image with a segmentation mask?",
    "Could you provide a segmentation mask for the {class_name} in this image",
    "Please identify and segment the {class_name} in this image",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask",
    "Can you highlight the {class_name} in this image with a segmentation mask",
]

ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]


@dataclass(frozen=True)
class ChatTemplate:
    """One chat template: the user turn wrapper, the answer suffix (trained) and separator (not trained)."""

    instruction: str
    suffix: str
    sep: str
    system: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    "qwen_chat": ChatTemplate(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        sep="\n",
    ),
    "phi3_chat": ChatTemplate(
        system="<|system|>\n{system}<|end|>\n",
        instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        sep="\n",
    ),
    "internlm2_chat": ChatTemplate(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        sep="\n",
    ),
}


def get_template(name: str) -> ChatTemplate:
    """Return the chat template called ``name`` (``-`` and ``_`` are equivalent, as in the official code)."""
    key = name.replace("-", "_")
    if key not in TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[key]


def clean_phrase(phrase: str) -> str:
    """Lower-case a phrase and strip a trailing '.', as the official data pipeline does."""
    phrase = phrase.strip().lower()
    while phrase.endswith("."):
        phrase = phrase[:-1].rstrip()
    return phrase


def image_token_string(n_tiles: int, tokens_per_tile: int = 256) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * n_tiles) + ``</img>``."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (tokens_per_tile * n_tiles) + IMG_END_TOKEN


def first_turn_input(question: str, n_tiles: int, tokens_per_tile: int = 256) -> str:
    """The first human turn: ``"<image>\\n" + question`` with the image placeholder expanded."""
    text = IMAGE_PLACEHOLDER + "\n" + question
    return text.replace(IMAGE_PLACEHOLDER, image_token_string(n_tiles, tokens_per_tile))


def sample_question(phrase: str, rng: random.Random, forms: Sequence[str] | None = None) -> str:
    """Draw one question form from ``forms`` (default SEG_QUESTIONS, as the list is) and fill in the phrase
    (``{class_name}``)."""
    return rng.choice(list(forms) if forms else SEG_QUESTIONS).format(class_name=clean_phrase(phrase))


def sample_answer(rng: random.Random) -> str:
    """Draw one answer form from ANSWER_LIST."""
    return rng.choice(ANSWER_LIST)
