"""save_run / open_run: exact round trips, no silent overwrite, clear errors on foreign or damaged stores."""

import json
import shutil

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.runs import RunExistsError


@pytest.fixture(scope="module")
def run(tiny):
    return wb.capture(tiny, ["one text here", "a second, longer text — with ünïcode"],
                      ["resid_pre", "attn_pattern", "attn_received", "value_norm", "logits"], progress=False)


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_round_trip_is_exact(run, tmp_path, suffix):
    path = wb.save_run(run, tmp_path / f"r{suffix}")
    back = wb.open_run(path)
    xr.testing.assert_identical(back.load(), run)
    assert json.loads(back.attrs["package_versions"])["workbench"]


def test_zarr_opens_lazily(run, tmp_path):
    back = wb.open_run(wb.save_run(run, tmp_path / "r.zarr"))
    assert back.resid_pre.chunks is not None  # a dask array: nothing read yet
    eager = wb.open_run(tmp_path / "r.zarr", lazy=False)
    assert eager.resid_pre.chunks is None


def test_refuses_to_overwrite(run, tmp_path):
    path = wb.save_run(run, tmp_path / "r.zarr")
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(RunExistsError, match="overwrite=True"):
        wb.save_run(run, path)
    assert sorted(p.name for p in path.rglob("*")) == before
    changed = run.assign_attrs(model="something else")
    wb.save_run(changed, path, overwrite=True)
    assert wb.open_run(path).attrs["model"] == "something else"


def test_interrupted_save_leaves_nothing(run, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", boom)
    with pytest.raises(KeyboardInterrupt):
        wb.save_run(run, tmp_path / "r.zarr")
    # only the path's lock file stays (deleting lock files would break the locking)
    assert [p.name for p in tmp_path.iterdir()] == [".r.zarr.lock"]


def test_interrupted_overwrite_keeps_the_old_run(run, tmp_path, monkeypatch):
    path = wb.save_run(run, tmp_path / "r.zarr")
    monkeypatch.setattr(xr.Dataset, "to_zarr", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        wb.save_run(run, path, overwrite=True)
    xr.testing.assert_identical(wb.open_run(path).load(), run)


def test_foreign_zarr_store_is_not_a_run(tmp_path):
    xr.Dataset({"x": ("t", np.arange(3))}).to_zarr(tmp_path / "foreign.zarr")
    with pytest.raises(wb.InvalidRunError, match="not a workbench run"):
        wb.open_run(tmp_path / "foreign.zarr")


def test_garbage_folder_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ this is not json")
    with pytest.raises(wb.InvalidRunError, match="could not be read"):
        wb.open_run(bad)


def test_damaged_store_is_a_clear_error(run, tmp_path):
    path = wb.save_run(run, tmp_path / "r.zarr")
    shutil.rmtree(path / "resid_pre")  # a variable's data is gone
    with pytest.raises(wb.InvalidRunError, match="resid_pre"):
        wb.open_run(path)


def test_corrupted_chunk_is_caught_by_verification(run, tmp_path):
    path = wb.save_run(run, tmp_path / "r.zarr")
    chunk = next(p for p in (path / "value_norm").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()  # zarr would silently read fill values (NaN) here
    wb.open_run(path)  # lazy: structure only
    with pytest.raises(wb.InvalidRunError, match="value_norm differ"):
        wb.open_run(path, lazy=False)


def test_damaged_netcdf_is_a_clear_error(run, tmp_path):
    path = wb.save_run(run, tmp_path / "r.nc")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(wb.InvalidRunError, match="could not be read"):
        wb.open_run(path)


def test_path_errors(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="workbench demo"):
        wb.open_run(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match=".zarr"):
        wb.save_run(run, tmp_path / "run.parquet")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="writable"):
        wb.save_run(run, blocker / "r.zarr")


def test_validator_lists_problems(run):
    broken = run.drop_vars("token").drop_attrs()
    with pytest.raises(wb.InvalidRunError, match="not a workbench run"):
        wb.validate_run(broken)
    broken = run.drop_vars("token")
    del broken.attrs["backend"]
    with pytest.raises(wb.InvalidRunError, match="backend.*token|token.*backend") as err:
        wb.validate_run(broken)
    assert "missing coordinate 'token'" in str(err.value)


def test_staged_study_folder_is_all_or_nothing(tmp_path):
    from workbench.studies.staging import staged_folder

    final = tmp_path / "study"
    with staged_folder(final) as work:
        (work / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1" and not work.exists()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        with staged_folder(final):
            pass
    with pytest.raises(RuntimeError):
        with staged_folder(final, overwrite=True) as work:
            (work / "a.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert (final / "a.txt").read_text() == "1"  # the finished study survives an interrupted redo
    with staged_folder(final, overwrite=True) as work:  # leftovers of the interrupted one are cleared
        assert not any(work.iterdir())
        (work / "b.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_flipped_bit_is_caught_when_read_lazily(run, tmp_path):
    """Every chunk carries a CRC-32C, checked whenever dask reads it: no verify=True needed."""
    path = wb.save_run(run, tmp_path / "r.zarr")
    chunk = next(p for p in (path / "resid_pre").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    lazy = wb.open_run(path)
    lazy.value_norm.values  # undamaged variables read fine
    with pytest.raises(ValueError, match="checksum"):
        lazy.resid_pre.values


def test_overwrite_never_touches_what_is_not_a_run(run, tmp_path):
    folder = tmp_path / "notes.zarr"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(RunExistsError, match="not a run"):
        wb.save_run(run, folder, overwrite=True)
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_overwrite_swaps_by_renames(run, tmp_path, monkeypatch):
    """The old run is moved aside before the new one moves in, and deleted last: if that last step
    fails, the new run is in place and nothing is half-deleted."""
    import workbench.runs as runs

    path = wb.save_run(run, tmp_path / "r.zarr")
    monkeypatch.setattr(runs, "_remove", lambda p: (_ for _ in ()).throw(OSError("disk gone")))
    changed = run.assign_attrs(model="new")
    with pytest.raises(OSError):
        wb.save_run(changed, path, overwrite=True)
    assert wb.open_run(path).attrs["model"] == "new"
    monkeypatch.undo()
    wb.save_run(run, path, overwrite=True)  # the next write clears the old run left beside it
    assert not list(tmp_path.glob(".r.zarr.old-*")) and not list(tmp_path.glob(".r.zarr.tmp-*"))


def test_second_writer_is_refused_at_once(run, tmp_path):
    from workbench.locks import WriterBusyError, exclusive

    from .conftest import lock_held_elsewhere

    path = tmp_path / "r.zarr"
    with lock_held_elsewhere(path) as pid:
        with pytest.raises(WriterBusyError, match=f"pid {pid}"):
            wb.save_run(run, path)
        assert not path.exists()
    with exclusive(path):  # the kernel released the dead holder's lock
        pass
    wb.save_run(run, path)


def test_two_runs_of_one_study_cannot_interleave(tmp_path):
    """A second process running the same study is refused before it touches the first one's .partial."""
    import subprocess
    import sys

    from workbench.locks import WriterBusyError
    from workbench.studies.staging import staged_folder

    final = tmp_path / "study"
    first = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom workbench.studies.staging import staged_folder\n"
        f"with staged_folder({str(final)!r}) as work:\n    (work / 'mpe.bin').write_text('checkpoint')\n"
        "    print('writing', flush=True)\n    time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(WriterBusyError, match="study"):
            with staged_folder(final, overwrite=True):
                pass
        assert (final.with_name("study.partial") / "mpe.bin").exists()  # the first one's work is intact
    finally:
        first.kill()
        first.wait()
