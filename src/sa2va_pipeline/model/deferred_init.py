"""Sa2VA without its weights (parameters on the ``meta`` device) and the sources that fill them later.

Under FSDP (``training.strategy: fsdp``, training/fsdp.py) no process ever holds the whole model: each rank
builds it here with every parameter on ``meta`` (no memory), shards it, allocates only its own shards, then
fills them from one of two sources, one tensor at a time:

- :class:`CheckpointTensors`: an official checkpoint read key by key (safetensors ``safe_open``), converted on
  the fly by the same :func:`.conversion.official_to_native` as the eager load; a plain rename is read only
  for the rows this rank holds (``get_slice``), a split or stacked tensor (InternViT ``qkv``, InternLM2
  ``wqkv``, SAM2 point embeddings) is read whole, converted, and cut. Checked like the eager load (the same
  :func:`.checkpoint.check_state` errors), from the files' headers before anything is read.
- :class:`PresetTensors`: the preset's deterministic random weights, built eagerly on one process's CPU (an
  exact replay of the eager construction's random draws on meta tensors is not possible: see the function).

Buffers are real from the start: :func:`parameters_on_meta` moves only parameters to ``meta``, so buffers
computed in ``__init__`` (rotary ``inv_freq``) are computed on the run's device exactly as in the eager
build, and the caller keeps them across ``to_empty``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conversion import POINT_EMBEDDINGS, _regex, official_to_native

# Rows of a native tensor a process needs: (start, stop) of dim 0, or None for all of it.
RowsWanted = Callable[[str], "tuple[int, int] | None"]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this context a parameter moves to the ``meta`` device as soon as a module registers it;
    buffers stay where they were created.

    torch's own ``with torch.device("meta")`` would also put the buffers on meta, losing the values computed
    in ``__init__`` (rotary ``inv_freq``, which is not in any checkpoint). accelerate's
    ``init_empty_weights(include_buffers=False)`` does what this does (not a dependency here). Each parameter
    exists on its real device only between its creation and its registration: one tensor at a time.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)  # subclass attributes, as accelerate keeps them
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def preset_on_meta(name: str, device: str, dtype: torch.dtype, seed: int, mask_resolution: str,
                   **overrides: Any) -> Any:
    """``Sa2VA.from_preset`` with its parameters on ``meta`` (buffers real, computed on ``device``)."""
    from .sa2va import Sa2VA

    with parameters_on_meta():
        return Sa2VA.from_preset(name, device=device, dtype=dtype, seed=seed, mask_resolution=mask_resolution,
                                 **overrides)


def checkpoint_on_meta(path: str | Path, device: str, dtype: torch.dtype,
                       mask_resolution: str = "standard") -> tuple[Any, CheckpointTensors]:
    """``Sa2VA.from_pretrained`` with its parameters on ``meta``, and the checkpoint's tensors to fill them.

    Checked as the eager load checks (config, family, tokenizer, then every key, shape and dtype kind against
    the model, from the safetensors headers); the SAM2 tensors kept aside (small) are read here."""
    from .checkpoint import _untie_qwen_vl_lm_head, check_state, finish_loaded, open_checkpoint
    from .sa2va import Sa2VA

    path, config, files, tokenizer = open_checkpoint(path, mask_resolution)
    with parameters_on_meta():
        model = Sa2VA.build(config, tokenizer, device, dtype, init_weights=False)
    tensors = CheckpointTensors(files, model.layout, dtype)
    native = tensors.native_meta()
    given = set(native)
    _untie_qwen_vl_lm_head(model, native, config)
    tensors.aliases = {name: "vlm.model.language_model.embed_tokens.weight" for name in set(native) - given}
    check_state(native, tensors.unknown, model.state_dict(), path)
    finish_loaded(model, path, tensors.kept_aside())
    return model.eval(), tensors


class PresetTensors:
    """A preset's weights, built eagerly on the CPU of the process that calls this with ``build=True``.

    Why not on meta: the eager construction draws every weight from one random stream in construction order
    (module ``__init__``, then transformers' ``_init_weights``); replaying that stream per shard would mean
    re-implementing each module's init. Built once on one CPU, the values are those of
    ``Sa2VA.from_preset(seed)`` on the CPU, and the caller sends each tensor to the other ranks (host memory:
    one model on one process; device memory: one tensor at a time). On a GPU this differs from an eager GPU
    build of the same seed only in which generator drew the numbers (CPU instead of CUDA).
    """

    def __init__(self, name: str, dtype: torch.dtype, seed: int, mask_resolution: str, build: bool,
                 **overrides: Any) -> None:
        from .sa2va import Sa2VA

        self.dtype = dtype  # of the floating tensors sent (the eager build's dtype)
        self.state: dict[str, torch.Tensor] | None = None
        if build:
            model = Sa2VA.from_preset(name, device="cpu", dtype=dtype, seed=seed, mask_resolution=mask_resolution,
                                      **overrides)
            self.state = model.state_dict()

    def __getitem__(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (native name); only on the process that built the model."""
        if self.state is None:
            raise RuntimeError("PresetTensors: this process did not build the preset (build=False)")
        return self.state[name]


class CheckpointTensors:
    """An official checkpoint as a stream of native tensors (see the module docstring).

    ``groups``: the official keys read together (one key, or the SAM2 point embeddings), in file order;
    ``outputs[i]``: the native names group ``i`` converts to; ``renames``: groups that are one plain rename
    (readable by rows); ``aliases``: native names filled with a copy of another native tensor (an untied
    Qwen-VL ``lm_head`` from ``embed_tokens``).
    """

    def __init__(self, files: list[Path], layout: Any, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        from .checkpoint import _damaged

        self.layout, self.dtype = layout, dtype
        self.where: dict[str, Path] = {}
        self.meta: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        part = handle.get_slice(key)
                        self.where[key] = file
                        self.meta[key] = torch.empty(part.get_shape(), dtype=_DTYPES[part.get_dtype()], device="meta")
            except Exception as error:  # safetensors' own errors for a damaged header
                raise _damaged(file, error) from None
        point_re = _regex(POINT_EMBEDDINGS[0])
        points = tuple(k for k in self.meta if point_re.fullmatch(k))
        self.groups: list[tuple[str, ...]] = [(k,) for k in self.meta if k not in points] + ([points] if points else [])
        self.outputs: list[list[str]] = []
        self.renames: set[int] = set()
        self.kept_keys: list[str] = []
        self.unknown: list[str] = []
        for i, group in enumerate(self.groups):
            native, kept, unknown = official_to_native({k: self.meta[k] for k in group}, layout)
            self.outputs.append(list(native))
            self.kept_keys += list(kept)
            self.unknown += unknown
            if len(group) == 1 and len(native) == 1 and next(iter(native.values())) is self.meta[group[0]]:
                self.renames.add(i)
        self.aliases: dict[str, str] = {}
        self._open: dict[Path, Any] = {}

    def native_meta(self) -> dict[str, torch.Tensor]:
        """Every native tensor the checkpoint gives, as meta tensors of the converted shapes and dtypes."""
        native, _, _ = official_to_native(self.meta, self.layout)
        return native

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The official tensor ``key`` from its file (only ``rows`` of dim 0 when given)."""
        from safetensors import safe_open

        file = self.where[key]
        if file not in self._open:  # each file's header is parsed once per stream
            self._open[file] = safe_open(str(file), framework="pt")
        handle = self._open[file]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows[0] : rows[1]]

    def kept_aside(self) -> dict[str, torch.Tensor]:
        """The SAM2 video/memory tensors, unconverted (written back at export), on the CPU."""
        try:
            return {k: self.read(k) for k in self.kept_keys}
        finally:
            self._open.clear()

    def stream(self, rows_wanted: RowsWanted,
               only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor, int, int]]:
        """``(native name, tensor, first row, bytes read for it)`` for every native tensor (or only those
        converted together with a name in ``only``), in the model's dtype for floating tensors (as the eager
        load casts). ``rows_wanted(name)`` is the row range this process keeps (None: all); a plain rename is
        read for those rows only, anything else whole (the caller cuts it)."""
        try:
            yield from self._stream(rows_wanted, only)
        finally:
            self._open.clear()  # closes the files

    def _stream(self, rows_wanted: RowsWanted, only: set[str] | None) -> Iterator[tuple[str, torch.Tensor, int, int]]:
        by_source: dict[str, list[str]] = {source: [] for source in self.aliases.values()}
        for alias, source in self.aliases.items():
            by_source[source].append(alias)
        for i, group in enumerate(self.groups):
            if not self.outputs[i]:
                continue  # kept aside or unknown: not a model tensor
            if only is not None and not any(n in only or set(by_source.get(n, ())) & only for n in self.outputs[i]):
                continue
            if i in self.renames:
                name = self.outputs[i][0]
                rows = rows_wanted(name)
                if rows is not None and all(rows_wanted(a) == rows for a in by_source.get(name, [])):
                    tensor = self.read(group[0], rows)
                    converted = {name: tensor}
                    start = rows[0]
                else:
                    tensor = self.read(group[0])
                    converted, start = {name: tensor}, 0
                read_bytes = _nbytes(tensor)
            else:
                tensors = {k: self.read(k) for k in group}
                converted, _, _ = official_to_native(tensors, self.layout)
                read_bytes = sum(_nbytes(t) for t in tensors.values()) + sum(_nbytes(t) for t in converted.values())
                start = 0
            for name, tensor in converted.items():
                tensor = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
                yield name, tensor, start, read_bytes
                for alias in by_source.get(name, []):
                    yield alias, tensor, start, read_bytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# safetensors' dtype names (get_dtype) -> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
