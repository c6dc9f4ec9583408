"""Per-text scores kept on disk while a study runs, so that an interrupted study resumes where it stopped.

A study that scores many texts one by one (:mod:`.byte_ensemble`: an hour or more) writes each
text's scores here as soon as they come back, one ``.npz`` file per (model, text), through a
temporary file and a rename: a kill at any moment leaves whole records or none, and the next run
of the same study scores only the texts without one. Records are keyed by the model's name, what
the caller says the scores depend on (the scorer's settings, the weights' identity) and the text's
SHA-256, so a run asking for other settings or other weights never sees them. The
folder is ``<study folder>.scores``; the study removes it once its results are saved (the results
file then holds every score). Only the study holding the folder's lock (:mod:`workbench.locks`)
reads or writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..runs import write_text_atomic

FIELDS = ("renormalised", "seconds", "calls", "positions")  # one number per text, besides the per-byte logprob
MARKER = ".workbench-text-scores"  # in the folder: ours to delete


class TextScores:
    """The records of one study folder: ``get``, ``put``, and ``clear`` (to start over, or once the study is saved)."""

    def __init__(self, folder: str | Path):
        self.root = Path(str(Path(folder)) + ".scores")

    def _model_dir(self, model: str, settings: dict) -> Path:
        key = json.dumps({"model": model, **settings}, sort_keys=True)
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:16]

    def _path(self, model: str, settings: dict, text: str) -> Path:
        return self._model_dir(model, settings) / (hashlib.sha256(text.encode("utf-8")).hexdigest() + ".npz")

    def get(self, model: str, settings: dict, text: str) -> dict | None:
        """The record of ``text`` under ``model`` and ``settings``, or None (none, or one that does not read back
        whole: it is scored again)."""
        path = self._path(model, settings, text)
        if not path.exists():
            return None
        try:
            with np.load(path) as f:
                record = {"logprob": f["logprob"].astype(np.float64), **{k: float(f[k]) for k in FIELDS}}
        except Exception:  # damaged (the rename makes a partial write impossible, a disk fault does not)
            return None
        return record if record["logprob"].shape == (len(text.encode("utf-8")),) else None

    def put(self, model: str, settings: dict, text: str, record: dict) -> None:
        folder = self._model_dir(model, settings)
        if not folder.exists():
            if not (self.root / MARKER).exists():
                write_text_atomic(self.root / MARKER, "per-text scores of an unfinished study (workbench)\n")
            folder.mkdir()
            write_text_atomic(folder / "model.json", json.dumps({"model": model, **settings}))
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npz.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, logprob=np.asarray(record["logprob"], dtype=np.float64),
                         **{k: np.float64(record[k]) for k in FIELDS})
            os.replace(tmp, self._path(model, settings, text))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def drop_temporary(self) -> int:
        """Delete temporary files of writes a kill interrupted; returns how many."""
        stale = list(self.root.glob("*/.*.npz.tmp")) if self.root.exists() else []
        for path in stale:
            path.unlink()
        return len(stale)

    def count(self) -> int:
        return len(list(self.root.glob("*/*.npz"))) if self.root.exists() else 0

    def clear(self) -> None:
        """Delete the records; a folder of that name that the workbench did not write is refused, not deleted."""
        if not self.root.exists():
            return
        if not (self.root / MARKER).exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} was not written by the workbench (no {MARKER} in it); move it away "
                                  "before running the study.")
        shutil.rmtree(self.root)
