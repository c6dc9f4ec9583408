"""Write a study into ``<folder>.partial`` and rename it when complete, so an interrupted study
never passes for a finished one and a finished one is never overwritten by accident.

The study folder's lock (:mod:`workbench.locks`) is held from start to finish: a second process
running the same study is refused at once (it would otherwise delete the first one's
``.partial`` and both would report success over a folder missing half its files).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..locks import exclusive
from ..runs import RunExistsError, swap_into_place

OPTIONS_FILE = "options.json"  # the options a study was run with, saved with its results


@contextmanager
def staged_folder(folder: str | Path, overwrite: bool = False, options: Optional[dict] = None) -> Iterator[Path]:
    """Yield the ``.partial`` folder to write into; on success it replaces ``folder``.

    An existing ``folder`` is an error unless ``overwrite``; leftovers of an interrupted
    study (``.partial``) are removed first. If the body raises, ``folder`` is untouched.
    ``options`` (JSON-serialisable) are saved as ``options.json`` with the results, so a later
    run can tell whether they were made with the options it is asked for (:func:`saved_options`).
    """
    final = Path(folder)
    with exclusive(final, what="study"):
        if final.exists() and not overwrite:
            raise RunExistsError(
                f"{final} already holds a study; pass overwrite=True (CLI: --recompute) to redo it, or choose another "
                "folder."
            )
        work = final.with_name(final.name + ".partial")
        if work.exists():  # ours to remove: no other process holds the lock
            shutil.rmtree(work)
        work.mkdir(parents=True)
        if options is not None:
            (work / OPTIONS_FILE).write_text(json.dumps(options, indent=1), encoding="utf-8")
        yield work
        swap_into_place(work, final)


def saved_options(folder: str | Path) -> Optional[dict]:
    """The options a staged study in ``folder`` was run with; None when it recorded none (an older study)."""
    path = Path(folder) / OPTIONS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
