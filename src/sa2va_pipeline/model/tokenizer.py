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

from pathlib import Path

from .prompts import ANSWER_LIST, SA2VA_ADDED_TOKENS, SEG_QUESTIONS, TEMPLATES

# Qwen2.5 specials in id order from 151643 (22 tokens), then InternVL's 9 tokens from 151665.
# fmt: off
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Qwen3 (Qwen3-VL) adds these after Qwen2.5's 22 specials (ids 151665..151668).
QWEN3_SPECIALS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
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


def build_tokenizer(realistic_ids: bool = False, internvl_tokens: bool = True, qwen3_tokens: bool = False):
    """Build the code tokenizer as a transformers ``PreTrainedTokenizerFast``.

    Args:
        realistic_ids: pad the vocabulary so special tokens get the ids of the released Qwen2.5-based
            Sa2VA checkpoints (``<|endoftext|>`` = 151643, ``<IMG_CONTEXT>`` = 151667, ``[SEG]`` = 151674;
            ``<|vision_start|>`` = 151652, ``<|image_pad|>`` = 151655 as in Qwen2.5-VL / Qwen3-VL).
        internvl_tokens: add InternVL's ``<img>``/``<IMG_CONTEXT>``... (InternVL family). The Qwen-VL family
            has none: Sa2VA's tokens follow Qwen's specials directly.
        qwen3_tokens: add Qwen3's ``<tool_response>``... ``</think>`` after Qwen2.5's specials (Qwen3-VL), so
            Sa2VA's ``[SEG]`` gets 151669 instead of 151665 with ``realistic_ids``.
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
    specials = (
        QWEN_SPECIALS
        + (QWEN3_SPECIALS if qwen3_tokens else [])
        + (INTERNVL_SPECIALS if internvl_tokens else [])
        + SA2VA_ADDED_TOKENS
    )
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=None,
        model_max_length=32768,
    )
    return fast


# ---------------------------------------------------------------------------------------------------------
# InternLM2 (Sa2VA-8B/26B): a fast tokenizer built from the checkpoint's sentencepiece ``tokenizer.model``.
# The checkpoint's own tokenizer is remote code (InternLM2Tokenizer, a sentencepiece wrapper); we never run
# it. A sentencepiece BPE model is a list of pieces with scores; the equivalent ``tokenizers`` BPE takes the
# pieces as the vocabulary and derives the merges from them (every split of a piece into two pieces, ranked
# by the merged piece's score), with byte fallback and "▁" for spaces, as transformers' Llama converter does.
# sentencepiece itself is not needed: the model file is read with protobuf.
INTERNLM2_SPECIALS = [
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
]  # fmt: skip


def _sentencepiece_proto():
    from transformers.convert_slow_tokenizer import import_protobuf

    return import_protobuf("reading a sentencepiece tokenizer.model needs protobuf")


def read_sentencepiece(path: str | Path):
    """Parse a sentencepiece ``tokenizer.model`` (protobuf) without the sentencepiece library."""
    proto = _sentencepiece_proto().ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE vocabulary: (left, right) for every piece = left + right, best score
    first (ties by the ids of left and right), as transformers' SentencePieceExtractor orders them."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(lr, -scores[piece], piece_id) for lr in local]
    merges.sort(key=lambda m: (m[1], m[2]))  # stable: keeps the (left, right) id order within a piece
    return [m[0] for m in merges]


def tokenizer_from_sentencepiece(
    model_file: str | Path,
    added_tokens: dict[str, int] | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str | None = "</s>",
    unk_token: str = "<unk>",
):
    """A ``PreTrainedTokenizerFast`` equal to the sentencepiece BPE model ``model_file`` plus added tokens.

    Control and user-defined pieces (``<s>``, ``<|im_start|>``...) and ``added_tokens`` (token -> id, e.g.
    from ``added_tokens.json``: InternVL's ``<img>``/``<IMG_CONTEXT>``... and Sa2VA's ``[SEG]``...) are
    matched whole. Encoding with ``add_special_tokens=True`` prepends BOS (as InternLM2Tokenizer does);
    the training and prediction code prepends it explicitly.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = read_sentencepiece(model_file)
    if proto.trainer_spec.model_type != 2:  # sentencepiece ModelType.BPE
        raise ValueError(f"{model_file}: only sentencepiece BPE models are supported (InternLM2 is BPE).")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    scores = {p.piece: p.score for p in pieces}
    normal = {p.piece: vocab[p.piece] for p in pieces if p.type in (1, 6)}  # NORMAL, BYTE
    bpe = models.BPE(
        vocab=vocab,
        merges=_bpe_merges(normal, scores),
        unk_token=pieces[proto.trainer_spec.unk_id].piece,
        fuse_unk=True,
        byte_fallback=bool(proto.trainer_spec.byte_fallback),
    )
    tok = Tokenizer(bpe)
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    specials = [p.piece for p in pieces if p.type in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    extra = sorted((added_tokens or {}).items(), key=lambda kv: kv[1])
    for token, token_id in extra:
        if token in vocab:  # a piece of the model listed as added: match it whole, keep its id
            tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            continue
        if token_id != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"Added token {token!r} has id {token_id} but would get {tok.get_vocab_size(True)}; "
                "the added tokens must follow the sentencepiece vocabulary without gaps."
            )
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    bos_id = vocab.get(bos_token)
    if bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def build_sentencepiece_model(realistic_ids: bool = False) -> bytes:
    """A small sentencepiece BPE ``tokenizer.model`` in the InternLM2 layout, built in code (for presets).

    Pieces: ``<unk> <s> </s>``, the 256 byte pieces, "▁"-words and their prefixes from the same corpus as
    :func:`build_tokenizer`, then InternLM2's chat specials (``<|im_end|>`` ...). With ``realistic_ids`` the
    vocabulary is padded with unreachable pieces so it has InternLM2's 92,544 entries and the specials their
    real ids (``<|im_start|>`` = 92543).
    """
    pb = _sentencepiece_proto()
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = 2
    proto.trainer_spec.vocab_size = 0
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False

    def add(piece: str, kind: int, score: float = 0.0) -> None:
        entry = proto.pieces.add()
        entry.piece, entry.type, entry.score = piece, kind, score

    add("<unk>", 2)
    add("<s>", 3)
    add("</s>", 3)
    for b in range(256):
        add(f"<0x{b:02X}>", 6)
    words = sorted({w for text in _corpus() for w in text.replace("\n", " ").split(" ") if w})
    pieces: list[str] = []
    seen: set[str] = set()
    for word in words:  # every prefix of "▁word" so that BPE can build it left to right
        marked = "▁" + word
        for end in range(1, len(marked) + 1):
            if marked[:end] not in seen:
                seen.add(marked[:end])
                pieces.append(marked[:end])
    chars = {c for p in pieces for c in p}  # single characters first (best scores)
    ordered = sorted(set(pieces) | chars, key=lambda p: (len(p), p))
    for rank, piece in enumerate(ordered):
        add(piece, 1, -float(rank))
    target = 92544 - len(INTERNLM2_SPECIALS) if realistic_ids else len(proto.pieces)
    for i in range(len(proto.pieces), target):
        add(f"<unused_{i}>", 5)  # UNUSED: never produced
    for special in INTERNLM2_SPECIALS:
        add(special, 4)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def read_sentencepiece_bytes(data: bytes) -> int:
    """Number of pieces of a serialized sentencepiece model."""
    proto = _sentencepiece_proto().ModelProto()
    proto.ParseFromString(data)
    return len(proto.pieces)


def build_preset_tokenizer(llm: str, realistic_ids: bool = False):
    """(tokenizer, sentencepiece model bytes or None) of a preset: byte-level BPE for Qwen2 LLMs; for
    InternLM2 a code-built sentencepiece model plus InternVL's and Sa2VA's added tokens, as in Sa2VA-8B."""
    if llm in ("qwen2_5_vl", "qwen3_vl"):
        qwen3 = llm == "qwen3_vl"
        return build_tokenizer(realistic_ids=realistic_ids, internvl_tokens=False, qwen3_tokens=qwen3), None
    if llm != "internlm2":
        return build_tokenizer(realistic_ids=realistic_ids), None
    import tempfile

    data = build_sentencepiece_model(realistic_ids=realistic_ids)
    size = read_sentencepiece_bytes(data)
    added = {t: size + i for i, t in enumerate(INTERNVL_SPECIALS + SA2VA_ADDED_TOKENS)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(data)
        return tokenizer_from_sentencepiece(Path(tmp) / "tokenizer.model", added), data
