"""Write a study into ``<folder>.partial`` and rename it when complete, so an interrupted study
never passes for a finished one and a finished one is never overwritten by accident."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..runs import RunExistsError


@contextmanager
def staged_folder(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield the ``.partial`` folder to write into; on success it replaces ``folder``.

    An existing ``folder`` is an error unless ``overwrite``; leftovers of an interrupted
    study (``.partial``) are removed first. If the body raises, ``folder`` is untouched.
    """
    final = Path(folder)
    if final.exists() and not overwrite:
        raise RunExistsError(
            f"{final} already holds a study; pass overwrite=True (CLI: --recompute) to redo it, or choose another folder."
        )
    work = final.with_name(final.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    yield work
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
