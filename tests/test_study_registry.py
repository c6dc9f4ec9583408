"""The study registry drives the CLI, the gallery index and the README tables."""

from pathlib import Path

from typer.testing import CliRunner

from workbench.cli import app
from workbench.gallery import write_gallery_index
from workbench.studies.registry import (
    EMBEDDED_WEIGHTS_NOTE,
    STUDIES,
    first_table,
    readme_tables,
    sync_readme_tables,
)

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_equal_the_gallery_pages():
    shown = readme_tables(ROOT / "README.md")
    assert set(shown) == {"extreme-tokens", "next-token-law", "tokenization-bias", "byte-level", "byte-ensemble",
                          "tokenizers", "geometry"}
    for name, block in shown.items():
        page = (ROOT / "gallery" / STUDIES[name].page).read_text(encoding="utf-8")
        table = first_table(page)
        assert table and block.startswith(table + "\n"), name
        assert (EMBEDDED_WEIGHTS_NOTE in block) == STUDIES[name].weights_note, name


def test_sync_replaces_a_block_from_its_page(tmp_path):
    gallery = tmp_path / "gallery"
    (gallery / "tokenization_bias").mkdir(parents=True)
    (gallery / "tokenization_bias" / "summary.md").write_text("# T\n\nset-up\n\n| | a |\n|---|---|\n| x | 1 |\n\nmore\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study-table: tokenization-bias -->\n| old |\n<!-- /study-table -->\nafter\n")
    assert sync_readme_tables(readme, gallery)
    assert readme.read_text() == ("intro\n<!-- study-table: tokenization-bias -->\n| | a |\n|---|---|\n| x | 1 |\n"
                                  "<!-- /study-table -->\nafter\n")
    assert not sync_readme_tables(readme, gallery)  # nothing left to change


def test_every_study_is_a_command_with_its_options():
    runner = CliRunner()
    for name, study in STUDIES.items():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for flag in [o.flag for o in study.options] + ["--recompute", "--out"] + (["--model"] if study.per_model else []):
            assert flag in result.output, (name, flag)


def test_gallery_index_has_every_saved_study_page(tmp_path):
    for study in STUDIES.values():
        page = tmp_path / study.page
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"# {study.title}\n\n| | m |\n|---|---|\n| {study.name} | 1 |\n")
    index = write_gallery_index(tmp_path).read_text()
    for study in STUDIES.values():
        assert f"## {study.title}" in index and f"| {study.name} | 1 |" in index
        assert f"`workbench {study.name}`" in index


def test_missing_saved_study_says_which_command_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["gallery"])
    assert result.exit_code == 1 and "workbench demo" in result.output


def test_text_writes_replace_whole_files(tmp_path, monkeypatch):
    from workbench import runs

    target = tmp_path / "page.md"
    runs.write_text_atomic(target, "old\n")
    runs.write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["page.md"]

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    try:
        runs.write_text_atomic(target, "half\n")
    except OSError:
        pass
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["page.md"]  # old kept, no temp left


def test_saved_study_is_found_in_the_working_folder_or_one_up(tmp_path):
    from workbench.studies.registry import saved_study

    (tmp_path / "runs" / "byte_level").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    assert saved_study("byte_level", tmp_path) == tmp_path / "runs" / "byte_level"
    assert saved_study("byte_level", tmp_path / "notebooks") == tmp_path / "runs" / "byte_level"  # a notebook's folder
    assert saved_study("next_token_law", tmp_path / "notebooks") is None


def test_a_rerun_with_other_options_says_so_and_replaces_the_saved_study(tmp_path):
    """`workbench extreme-tokens --ablation-layers 0-5` over a study saved for all layers used to print 'using saved
    results' and keep them; now it says what differs and runs again (the old study stays until the new is complete)."""
    import dataclasses

    from workbench.studies.staging import staged_folder

    entry = dataclasses.replace(STUDIES["extreme-tokens"], folder=tmp_path / "extreme_tokens")
    folder = entry.folders(["m"])["m"]
    with staged_folder(folder, options={"ablation_layers": [0, 1, 2]}) as work:
        (work / entry.saved_file).mkdir()
    assert entry.options_changed(folder, {"ablation_layers": "0-2"}) == ""
    assert entry.options_changed(folder, {"ablation_layers": "0,1,2"}) == ""
    assert entry.options_changed(folder, {"ablation_layers": None}) == "ablation_layers='0,1,2'"
    runs, said = [], []
    fake = dataclasses.replace(entry, run=lambda *a: runs.append(a))
    fake.run_missing(["m"], {"ablation_layers": "0-2"}, False, said.append)
    assert runs == [] and "using saved results" in said[-1]
    fake.run_missing(["m"], {"ablation_layers": None}, False, said.append)
    assert runs == [("m", folder, {"ablation_layers": None}, True)] and "ablation_layers='0,1,2'" in said[-1]
    (folder / "options.json").unlink()  # a study saved before the options were recorded
    assert entry.options_changed(folder, {"ablation_layers": None}) is None
    fake.run_missing(["m"], {"ablation_layers": None}, False, said.append)
    assert len(runs) == 1 and "do not record the options" in said[-1] and "--recompute" in said[-1]

    law = dataclasses.replace(STUDIES["next-token-law"], folder=tmp_path / "next_token_law")
    folder = law.folders(["m"])["m"]
    options = {"tokens": 50_000, "probe_tokens": 30_000, "lens_tokens": 4096, "lens_steps": 20}
    with staged_folder(folder, options=options) as work:
        (work / law.saved_file).write_text("")
    assert law.options_changed(folder, options) == ""
    assert law.options_changed(folder, {**options, "tokens": 1000}) == "tokens=50000"
    assert STUDIES["tokenization-bias"].options_changed(tmp_path, {}) == ""  # a study without options
