"""``TrainedModelDataset``: a versioned folder holding a fine-tuned Sa2VA (adapter + trained weights + JSON).

Saving takes the in-memory :class:`sa2va_pipeline.training.artifacts.TrainedModel` returned by the
training node and writes it with :func:`~sa2va_pipeline.training.artifacts.save_trained_model` into
``<filepath>/<version>/<name>/`` through a temporary sibling folder renamed at the end (a crashed save never
looks like a finished version; a completeness record is checked on load; stale temporaries of killed saves
are removed at the next save). Loading returns the version folder's :class:`~pathlib.Path`; rebuild the
model from it with :func:`sa2va_pipeline.training.artifacts.load_trained_model`, so downstream nodes decide
the device and dtype themselves and nothing heavy is built on load.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version

from sa2va_pipeline.datasets.atomic_files import check_folder_record, published_folder


class TrainedModelDataset(AbstractVersionedDataset[Any, Path]):
    """A fine-tuned model folder. Example catalog entry::

    trained_model:
      type: sa2va_pipeline.datasets.trained_model.TrainedModelDataset
      filepath: data/06_models/trained_model
      versioned: true
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None):
        """Create the dataset; ``filepath`` is the folder (a version folder goes inside it if versioned)."""
        super().__init__(PurePosixPath(Path(filepath).as_posix()), version)
        self.metadata = metadata

    def load(self) -> Path:
        """The folder of the requested (default: latest) version."""
        root = Path(str(self._get_load_path())).absolute()
        if not (root / "model_source.json").is_file():
            raise DatasetError(
                f"{root} is not a trained-model folder (no model_source.json); run the training pipeline first."
            )
        check_folder_record(root)
        return root

    def save(self, data: Any) -> None:
        """Write the trained model into a new version folder (atomically)."""
        from sa2va_pipeline.training.artifacts import save_trained_model

        target = Path(str(self._get_save_path()))
        with published_folder(target, Path(str(self._filepath))) as staging:
            save_trained_model(data, staging)
        self._clear_version_cache()

    def _exists(self) -> bool:
        try:
            return (Path(str(self._get_load_path())) / "model_source.json").is_file()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
