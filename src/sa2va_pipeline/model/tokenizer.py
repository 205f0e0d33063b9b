"""A byte-level BPE tokenizer built in code, for the presets (no files, no downloads).

Like Qwen's tokenizer it is byte-level, so every string tokenizes. Its merges are built from a small corpus
(the question/answer forms, the template text and a few domain phrases) so that those words are single tokens;
other words fall back to shorter pieces and single bytes. Special tokens follow the layout of the released
checkpoints: Qwen's ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>``, InternVL's ``<img>``, ``</img>``,
``<IMG_CONTEXT>`` ..., then Sa2VA's ``[SEG] <p> </p> <vp> </vp>``. With ``realistic_ids=True`` the vocabulary
is
padded with unreachable placeholders so the special tokens get the ids they have in Sa2VA-1B/2B/4B.
"""

from __future__ import annotations

from .prompts import ANSWER_LIST, SA2VA_ADDED_TOKENS, SEG_QUESTIONS, TEMPLATES

# Qwen2.5 specials in id order from 151643 (22 tokens), then InternVL's 9 tokens from 151665.
# fmt: off
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
QWEN_FIRST_SPECIAL_ID = 151643

EXTRA_CORPUS = [
    "blood vessel", "blood vessels", "vessel", "vessels", "artery", "arteries", "coronary", "catheter",
    "background", "object", "the", "a", "an", "of", "and", "in", "this", "image", "picture", "mask",
    "user", "assistant", "system", "segmentation", "segment", "0 1 2 3 4 5 6 7 8 9",
]
# fmt: on


def _corpus() -> list[str]:
    texts = [q.format(class_name="blood vessel") for q in SEG_QUESTIONS]
    texts += [a.replace("[SEG]", "") for a in ANSWER_LIST]
    for t in TEMPLATES.values():
        for part in (t.instruction, t.system, t.suffix):
            texts.append(part.replace("{input}", " ").replace("{system}", " "))
    texts += EXTRA_CORPUS
    return texts


def build_tokenizer(realistic_ids: bool = False):
    """Build the code tokenizer as a transformers ``PreTrainedTokenizerFast``.

    Args:
        realistic_ids: pad the vocabulary so special tokens get the ids of the released Qwen2.5-based
            Sa2VA checkpoints (``<|endoftext|>`` = 151643, ``<IMG_CONTEXT>`` = 151667, ``[SEG]`` = 151674).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    words = sorted({piece for text in _corpus() for piece, _ in byte_level.pre_tokenize_str(text)})
    for word in words:
        # Left-to-right chain merges: "seg" = ("s","e") then ("se","g"); deterministic and always valid.
        current = word[0]
        for ch in word[1:]:
            merged = current + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, ch))
            current = merged
    if realistic_ids:
        for i in range(len(vocab), QWEN_FIRST_SPECIAL_ID):
            vocab[f"<|placeholder_{i}|>"] = i  # never produced: there is no merge that builds it
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIALS + INTERNVL_SPECIALS + SA2VA_ADDED_TOKENS
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=None,
        model_max_length=32768,
    )
    return fast
