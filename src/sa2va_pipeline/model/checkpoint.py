"""Reading and writing official Sa2VA checkpoint directories (safetensors only, no remote code, strict).

A directory holds ``config.json`` (model_type ``sa2va_chat``), tokenizer files and ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Loading converts keys with :mod:`.conversion` and refuses
anything it cannot account for, naming the keys. Saving merges LoRA into copies of the wrapped layers (the
live model is untouched), converts back, re-adds the SAM2 memory tensors kept aside at load, shards large
outputs, and copies the source checkpoint's remote-code ``*.py`` files so official loaders still work.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .configs import with_mask_resolution
from .conversion import native_to_official, official_to_native

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
_NAMES_SHOWN = 20


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message says what, where and what to do.

    A :class:`~sa2va_pipeline.errors.UserError` (the CLI prints it without a traceback) and a ``ValueError``
    (what it was before)."""


def _names(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _NAMES_SHOWN} more" if len(keys) > _NAMES_SHOWN else ""
    return ", ".join(keys[:_NAMES_SHOWN]) + more


# ---------------------------------------------------------------------------------------------- reading
DAMAGED = "re-download the checkpoint (or re-export it with save_pretrained)"


def read_json(file: Path) -> Any:
    """A checkpoint's JSON file; a file that is not valid JSON raises :class:`CheckpointError` naming it."""
    try:
        return json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); {DAMAGED}.") from None


def inside(folder: Path, name: str, listed_in: Path) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` once resolved: no absolute names, no
    ``..``, no symbolic link leading out (a checkpoint never reads files from elsewhere)."""
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{listed_in} names {name!r}, which is not a file inside {folder}; weights are only read from the "
            f"checkpoint folder: {DAMAGED}."
        )
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"{folder / name} leads outside the checkpoint folder {folder} (to {resolved}, through a symbolic "
            "link); weights are only read from the checkpoint folder: copy the file into it."
        )
    return folder / candidate


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, all inside it; pickled weights are refused."""
    index = path / INDEX_FILE
    if index.is_file():
        content = read_json(inside(path, INDEX_FILE, path))
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' of tensor name -> shard file; {DAMAGED}.")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if not s.endswith(".safetensors")]
        if bad:
            raise CheckpointError(
                f"{index} lists non-safetensors shards {bad}: pickled weights are never loaded."
            )
        files = [inside(path, s, index) for s in shards]
        missing = [s for s, f in zip(shards, files) if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [inside(path, SINGLE_FILE, path)]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has only pickled weights ({', '.join(pickles)}). Pickles can execute code and are never "
            "loaded; convert them to safetensors (e.g. with the official model in a sandbox) and retry."
        )
    raise CheckpointError(f"{path} has no {SINGLE_FILE} and no {INDEX_FILE}.")


def _damaged(file: Path, error: Exception) -> CheckpointError:
    size = file.stat().st_size if file.exists() else 0
    return CheckpointError(
        f"{file} ({size} bytes) cannot be read as safetensors ({error}): the file is truncated, empty or "
        f"damaged; {DAMAGED}."
    )


def read_keys(files: list[Path]) -> list[str]:
    """Tensor names of safetensors files, without reading the tensors; a damaged file is named."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys += list(handle.keys())
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError) for bad files
            raise _damaged(f, error) from None
    return keys


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of safetensors files on the CPU; a damaged file is named."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f), device="cpu"))
        except Exception as error:  # as read_keys: the file changed or its data is incomplete
            raise _damaged(f, error) from None
    return state


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def check_family(config: dict[str, Any], keys: list[str], path: Path) -> None:
    """Raise a clear error for Sa2VA checkpoints this library cannot load faithfully."""
    from .configs import llm_type, model_family

    model_type = str(config.get("model_type", ""))
    llm_arch = " ".join((config.get("llm_config") or {}).get("architectures") or [])
    has_qwen_keys = any(k.startswith("model.") for k in keys)
    if model_family(config) != "internvl":  # Sa2VA-Qwen2_5-VL / Qwen3-VL
        if model_type != "sa2va_chat":
            raise CheckpointError(f"{path}/config.json: model_type is {model_type!r}, expected 'sa2va_chat'.")
        if not has_qwen_keys:
            raise CheckpointError(
                f"{path}: config.json describes a Sa2VA-Qwen-VL model but no weight is under 'model.*' "
                "(the whole Qwen-VL model of the official layout)."
            )
        return
    if has_qwen_keys:
        raise CheckpointError(
            f"{path}: weights under 'model.*' (the Sa2VA-Qwen2.5-VL / Qwen3-VL layout) but config.json describes "
            "an InternVL-family model (no Qwen-VL text_config/vision_config); the config and weights do not match."
        )
    if model_type != "sa2va_chat":
        raise CheckpointError(f"{path}/config.json: model_type is {model_type!r}, expected 'sa2va_chat'.")
    if llm_type(config) not in ("qwen2", "internlm2"):
        raise CheckpointError(
            f"{path}: Sa2VA checkpoint with LLM {llm_arch or 'unknown'} is not supported "
            "(Qwen2ForCausalLM and InternLM2ForCausalLM are)."
        )
    # The official code supports these settings; our native composition implements only the released ones.
    if int(config.get("select_layer", -1)) != -1:
        raise CheckpointError(
            f"{path}/config.json: select_layer is {config['select_layer']}; only -1 (the last InternViT layer, "
            "as in every released Sa2VA checkpoint) is supported."
        )
    if str(config.get("ps_version", "v2")) != "v2":
        raise CheckpointError(
            f"{path}/config.json: ps_version is {config['ps_version']!r}; only 'v2' (the pixel shuffle of every "
            "released Sa2VA checkpoint) is supported."
        )


def _added_tokens(path: Path) -> dict[str, int]:
    """Added tokens (token -> id) of a sentencepiece checkpoint: added_tokens.json and tokenizer_config.json's
    ``added_tokens_decoder`` (pieces of the sentencepiece model itself are skipped later)."""
    added: dict[str, int] = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        decoder = read_json(config_file).get("added_tokens_decoder") or {}
        added.update({entry["content"]: int(i) for i, entry in decoder.items()})
    if (path / "added_tokens.json").is_file():
        for token, token_id in read_json(path / "added_tokens.json").items():
            if added.get(token, token_id) != token_id:
                raise CheckpointError(
                    f"{path}: token {token!r} has id {token_id} in added_tokens.json but {added[token]} in "
                    "tokenizer_config.json."
                )
            added[token] = int(token_id)
    return added


def load_tokenizer(path: Path, config: dict[str, Any] | None = None):
    """The checkpoint's tokenizer as a fast tokenizer, never remote code.

    InternLM2 checkpoints (Sa2VA-8B/26B) ship a sentencepiece ``tokenizer.model`` and remote code: the fast
    tokenizer is built from ``tokenizer.model`` plus the added tokens. Others ship ``tokenizer.json``.
    """
    from transformers import PreTrainedTokenizerFast

    from .configs import llm_type
    from .tokenizer import tokenizer_from_sentencepiece

    if config is not None and llm_type(config) == "internlm2" and (path / "tokenizer.model").is_file():
        try:
            return tokenizer_from_sentencepiece(path / "tokenizer.model", _added_tokens(path))
        except ValueError as error:
            raise CheckpointError(f"{path}: cannot build the InternLM2 tokenizer: {error}") from error
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json (and no tokenizer.model for an InternLM2 LLM); a fast tokenizer is "
            "required (no remote code)."
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            read_json(path / name)  # a damaged file is named rather than failing inside transformers
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as error:  # the tokenizers library raises plain Exceptions for files it cannot parse
        raise CheckpointError(f"{path}: cannot read the tokenizer files ({error}); {DAMAGED}.") from None


def open_checkpoint(path: str | Path, mask_resolution: str = "standard") -> tuple[Path, dict[str, Any], list[Path], Any]:
    """Check a checkpoint directory before any weight is read: ``(path, config, weight files, tokenizer)``,
    the config with ``mask_resolution`` applied. Shared by the eager load and the one onto meta tensors."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; expected an official Sa2VA checkpoint directory.")
    config = read_json(inside(path, "config.json", path))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'} is not a JSON object; {DAMAGED}.")
    config = with_mask_resolution(config, mask_resolution)
    files = weight_files(path)
    check_family(config, read_keys(files), path)
    return path, config, files, load_tokenizer(path, config)


def finish_loaded(model: Any, path: Path, kept: dict[str, torch.Tensor]) -> None:
    """What a loaded model carries besides its weights: the SAM2 tensors kept aside, its source folder and
    (InternLM2) the sentencepiece model written back at export."""
    lm_head, embed = model.vlm.lm_head.weight, model.vlm.get_input_embeddings().weight
    if lm_head is embed or (not lm_head.is_meta and lm_head.data_ptr() == embed.data_ptr()):
        raise CheckpointError(
            f"{path}: lm_head is tied to embed_tokens after loading; Sa2VA checkpoints are untied."
        )
    model.kept_aside = dict(kept)
    model.source_dir = path
    if model.layout.llm == "internlm2" and (path / "tokenizer.model").is_file():
        from .tokenizer import read_sentencepiece_bytes

        model.sentencepiece_model = (path / "tokenizer.model").read_bytes()
        model.sentencepiece_size = read_sentencepiece_bytes(model.sentencepiece_model)


def load_pretrained(
    cls: type,
    path: str | Path,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    mask_resolution: str = "standard",
) -> Any:
    """Build ``cls`` (:class:`.sa2va.Sa2VA`) from an official checkpoint directory (``from_pretrained``);
    ``mask_resolution`` as :func:`.configs.with_mask_resolution` (relative to the checkpoint's config)."""
    path, config, files, tokenizer = open_checkpoint(path, mask_resolution)
    model = cls.build(config, tokenizer, device, dtype, init_weights=False)

    native, kept, unknown = official_to_native(read_tensors(files), model.layout)
    _untie_qwen_vl_lm_head(model, native, config)
    check_state(native, unknown, model.state_dict(), path)
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in native.items()}, strict=True
    )
    finish_loaded(model, path, kept)
    return model.to(device).eval()


def check_state(
    native: dict[str, torch.Tensor], unknown: list[str], expected: dict[str, torch.Tensor], path: Path
) -> None:
    """Refuse converted weights that do not match the model exactly, naming every bad key: unknown, unexpected,
    missing, mis-shaped, or of another dtype kind (an integer tensor where a float weight belongs is never cast
    silently; float precisions may differ, they are cast to the model's dtype)."""
    missing = [k for k in expected if k not in native]
    unexpected = unknown + [k for k in native if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in native.items()
        if k in expected and v.shape != expected[k].shape
    ]
    kinds = [
        f"{k}: checkpoint {v.dtype} vs model {expected[k].dtype}"
        for k, v in native.items()
        if k in expected and _dtype_kind(v.dtype) != _dtype_kind(expected[k].dtype)
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if missing:
        problems.append(f"missing keys (native names): {_names(missing)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_names(shapes)}")
    if kinds:
        problems.append(f"keys of the wrong dtype kind: {_names(kinds)}")
    if problems:
        raise CheckpointError(f"{path}: the weights do not match the config. " + "; ".join(problems))


def _untie_qwen_vl_lm_head(model: Any, native: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A Qwen-VL checkpoint whose config ties the output embedding (as the base Qwen2.5-VL-3B / Qwen3-VL-4B
    do) and that ships no ``lm_head`` gets an untied copy of ``embed_tokens``; its config is marked untied, so
    an export writes ``lm_head`` and official loaders do not re-tie trained weights."""
    head, embed = "vlm.lm_head.weight", "vlm.model.language_model.embed_tokens.weight"
    tied = bool(config.get("tie_word_embeddings")) or bool(
        (config.get("text_config") or {}).get("tie_word_embeddings")
    )
    if model.family == "internvl" or not tied or head in native or embed not in native:
        return
    native[head] = native[embed].clone()
    model.config = copy.deepcopy(model.config)
    model.config["tie_word_embeddings"] = False
    if isinstance(model.config.get("text_config"), dict):
        model.config["text_config"]["tie_word_embeddings"] = False


# ---------------------------------------------------------------------------------------------- writing
def peft_wrappers(model: torch.nn.Module) -> list[str]:
    """Names of the outermost peft layer wrappers (LoRA layers, modules_to_save, trainable tokens)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return []
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not any(
            name.startswith(n + ".") for n in names
        ):
            names.append(name)
    return names


def unwrap_merged(module: torch.nn.Module) -> torch.nn.Module:
    """Merge a peft wrapper's deltas (LoRA, trainable tokens, modules_to_save) into its base layer and return
    that plain layer (the wrapper is consumed)."""
    if hasattr(module, "unload_and_optionally_merge_module"):
        return module.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
    module.merge(safe_merge=True)
    return module.get_base_layer()


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every peft wrapper merged and removed; the live model is not changed.

    Each wrapped layer is deep-copied on its own (small), merged and unwrapped in the copy; PeftModel
    prefixes (``base_model.model.``) are dropped, so the keys are those of the plain native model.
    """
    state = model.state_dict()
    for name in peft_wrappers(model):
        plain = unwrap_merged(copy.deepcopy(model.get_submodule(name)))
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in plain.state_dict().items()})
    return {re.sub(r"(^|\.)base_model\.model\.", r"\1", k): v for k, v in state.items()}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"Cannot read shard size {size!r}; use e.g. '5GB' or a byte count.")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def write_safetensors(state: dict[str, torch.Tensor], path: Path, max_shard_size: int | str = "5GB") -> None:
    """Write ``state`` as model.safetensors, or as shards plus model.safetensors.index.json when large."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for old in list(path.glob("model-*-of-*.safetensors")) + [path / SINGLE_FILE, path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def save_pretrained(model: Any, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """See :meth:`Sa2VA.save_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    official = native_to_official(merged_state_dict(model), model.kept_aside, model.layout)
    write_safetensors(official, path, max_shard_size)
    config = copy.deepcopy(model.config)
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    if "transformers_version" not in config:  # generated (preset) configs; tokenizer loaders look at it
        import transformers

        config["transformers_version"] = transformers.__version__
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = model.source_dir
    if source is not None and source.resolve() != path.resolve():
        # Tokenizer files verbatim (we never change the tokenizer), and the remote-code files real checkpoints
        # ship, which the official loader needs; those are never kept in our repo.
        names = (
            list(TOKENIZER_FILES) + ["generation_config.json"] + [f.name for f in sorted(source.glob("*.py"))]
        )
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, path / name)
    if model.sentencepiece_model is not None and not (path / "tokenizer.model").is_file():
        write_sentencepiece_tokenizer(model, path)
    elif model.sentencepiece_model is None and not (path / "tokenizer.json").is_file():
        write_tokenizer(model.tokenizer, path)


def write_tokenizer(tokenizer: Any, path: Path) -> None:
    """Save a code-built tokenizer so that transformers 4.x (the official code) can read it too."""
    tokenizer.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("backend", None)
    config.pop("extra_special_tokens", None)
    config["tokenizer_class"] = "Qwen2TokenizerFast"  # reads tokenizer.json; "TokenizersBackend" is 5.x only
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_sentencepiece_tokenizer(model: Any, path: Path) -> None:
    """Write a code-built InternLM2 tokenizer as the released checkpoints ship it: ``tokenizer.model``,
    ``added_tokens.json`` and a ``tokenizer_config.json`` naming InternLM2Tokenizer (the official loader needs
    the checkpoint's ``tokenization_internlm2.py`` next to it; our loader reads ``tokenizer.model``)."""
    tok = model.tokenizer
    (path / "tokenizer.model").write_bytes(model.sentencepiece_model)
    vocab = tok.get_vocab()
    added = {t: vocab[t] for t in tok.get_added_vocab() if vocab[t] >= model.sentencepiece_size}
    (path / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in sorted(tok.get_added_vocab().items(), key=lambda kv: kv[1])
    }  # fmt: skip
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "added_tokens_decoder": decoder,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
