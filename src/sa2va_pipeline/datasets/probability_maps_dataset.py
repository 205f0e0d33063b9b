"""``ProbabilityMapsDataset``: a split's maps per (image, phrase) as one compressed ``.npz``, versioned.

Layout inside the archive (loaded with ``allow_pickle=False``; nothing is pickled):
``ids`` and ``phrases`` (unicode arrays, one element per map), ``metadata`` (a JSON string: model identity,
split, phrases, prompt, encoding) and ``map_00000``, ``map_00001``, ... in the order of ``ids``/``phrases``,
each HxW ``uint8`` (round(p * 255)) or ``float16`` as produced by
:func:`sa2va_pipeline.prediction.predict_maps`. Files of the single-phrase version (no ``phrases`` array) load
with every map under ``metadata["phrase"]``.

``missing_ok: true`` makes ``load`` return ``None`` when no version has been saved yet. The threshold and
evaluation pipelines use this on a second, read-only entry pointing at the same file to find the latest
stored maps and skip prediction when they were made by the same trained model.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, VersionNotFoundError

from sa2va_pipeline.atomic import atomic_write_bytes
from sa2va_pipeline.prediction.maps import ProbabilityMaps


def read_maps(path: Path) -> ProbabilityMaps:
    """Read one archive (either layout, see the module docstring)."""
    with np.load(path, allow_pickle=False) as archive:
        ids = [str(i) for i in archive["ids"]]
        metadata = json.loads(str(archive["metadata"]))
        if "phrases" in archive.files:
            phrases = [str(p) for p in archive["phrases"]]
        else:  # single-phrase file
            phrases = [str(metadata.get("phrase") or "")] * len(ids)
            metadata.setdefault("phrases", [phrases[0]] if phrases else [])
        maps = {(i, p): archive[f"map_{index:05d}"] for index, (i, p) in enumerate(zip(ids, phrases))}
    return ProbabilityMaps(maps=maps, metadata=metadata)


class ProbabilityMapsDataset(AbstractVersionedDataset[ProbabilityMaps, "ProbabilityMaps | None"]):
    """Saves and loads :class:`~sa2va_pipeline.prediction.maps.ProbabilityMaps` as a compressed ``.npz`` file.

    Example catalog entry::

        val_probabilities:
          type: sa2va_pipeline.datasets.probability_maps_dataset.ProbabilityMapsDataset
          filepath: data/07_model_output/probabilities/val_probabilities.npz
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        missing_ok: bool = False,
        metadata: dict[str, Any] | None = None,
    ):
        """Create the dataset; with ``missing_ok`` a load before any save returns ``None``."""
        super().__init__(PurePosixPath(Path(filepath).as_posix()), version)
        self._missing_ok = missing_ok
        self.metadata = metadata

    def load(self) -> ProbabilityMaps | None:
        """Read the requested (default: latest) version; ``None`` if absent and ``missing_ok``."""
        try:
            path = Path(str(self._get_load_path()))
        except VersionNotFoundError:
            if self._missing_ok:
                return None
            raise
        if not path.is_file():
            if self._missing_ok:
                return None
            raise DatasetError(f"probability maps file '{path}' does not exist; run the pipeline making it")
        return read_maps(path)

    def save(self, data: ProbabilityMaps) -> None:
        """Write the maps and metadata to a new version (compressed, atomically)."""
        import io

        path = Path(str(self._get_save_path()))
        keys = data.keys()
        arrays = {f"map_{index:05d}": np.asarray(data.maps[key]) for index, key in enumerate(keys)}
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            ids=np.array([i for i, _ in keys], dtype=str),
            phrases=np.array([p for _, p in keys], dtype=str),
            metadata=np.array(json.dumps(data.metadata)),
            **arrays,
        )
        atomic_write_bytes(path, buffer.getvalue())
        self._clear_version_cache()

    def _exists(self) -> bool:
        try:
            return Path(str(self._get_load_path())).is_file()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "missing_ok": self._missing_ok}
