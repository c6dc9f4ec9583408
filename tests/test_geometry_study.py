"""The geometry study end to end on a tiny model (small inputs): files, page, figures, explorer, registry."""

import json
import re

import numpy as np
import pytest

import workbench as wb
from workbench.studies import geometry as study
from workbench.studies.registry import STUDIES
from workbench.widgets import GeometryExplorer

SMALL = study.StudyConfig(prompts=6, prompt_tokens=40, max_rank=16, shuffle_prompts=3, shuffle_levels=(0, 1, 2),
                          windows=24, window_tokens=8, truncation_ranks=(1, 4, 16, 64), fit_ranks=(4,),
                          effect_prompts=2, effect_tokens=16, stage_prompts=2, stage_tokens=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geometry") / "tiny"
    study.run_study(wb.load_model("tiny-random-llama"), folder, SMALL, progress=False, say=lambda _: None)
    return folder


def test_study_saves_every_part(saved):
    s = study.load_study(saved)
    assert set(s["summary"]["seconds"]) == {"geometry", "shuffle", "update statistics", "tokenwise fit", "fit effect",
                                            "stages", "trajectories", "redundancy"}
    g = s["geometry"]
    assert dict(g.sizes) == {"sample": 6, "depth": 3, "scale": 4, "k": 5}
    assert list(g.scale.values) == [2, 4, 8, 16] and np.isfinite(g.id.sel(depth=[1, 2])).all()
    assert list(s["shuffle"].level.values) == [0, 1, 2]
    assert s["stages"].sizes["intervention"] == 3 and s["stages"].sizes["layer_index"] == 2
    assert float(s["redundancy"].kl_full.max()) == 0 and float(s["redundancy"].key_max_abs_diff.max()) == 0
    memory = json.loads((saved / "memory.json").read_text())
    assert memory["gemma-3-4b"]["kv_bytes_per_token"] == 139264 and memory["gemma-3-4b"]["residual_bytes_per_token"] == 5120
    assert s["trajectories"].view.shape == (24, 3, 3)
    assert not (saved.parent / "tiny.partial").exists()


def test_a_finished_study_is_not_overwritten(saved):
    with pytest.raises(wb.RunExistsError, match="recompute"):
        study.run_study(wb.load_model("tiny-random-llama"), saved, SMALL)


def test_short_prompts_are_refused_before_any_work(tmp_path):
    config = study.StudyConfig(prompt_tokens=100, max_rank=256)
    with pytest.raises(ValueError, match="max_rank"):
        study.run_study(wb.load_model("tiny-random-llama"), tmp_path / "x", config)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_page_figures_and_explorer(saved, tmp_path):
    written = study.write_figures({"tiny": saved}, tmp_path / "geometry", formats=("svg",))
    assert {p.stem for p in written} == {"id_profile", "id_vs_loss", "shuffle_tiny-random-llama", "trajectories",
                                         "update_norms", "tokenwise_fit", "stages", "redundancy"}
    table = study.write_page({"tiny": saved}, tmp_path, tmp_path / "geometry.md")
    assert "tiny-random-llama" in table and "(tiny-random-llama)" not in table
    explorer = GeometryExplorer.from_study(saved)
    shown = float(re.search(r"<b>([\d.]+)</b>", explorer.caption.value).group(1))  # the caption states the curve
    curve = explorer.curves.data[0]
    assert shown == pytest.approx(curve.y[list(curve.x).index(explorer.depth.value)], abs=0.051)
    before = [list(t.y) for t in explorer.curves.data]
    explorer.level.value = 2
    assert [list(t.y) for t in explorer.curves.data] != before
    explorer.depth.value = 2
    assert explorer.curves.layout.shapes[0].x0 == 2
    assert np.allclose(explorer.bundle.data[1].x, explorer.trajectories.view.isel(layer=2, axis=0).values)
    explorer.prompt.value = 5  # outside the shuffled prompts: the level control is off
    assert explorer.level.disabled
    files = explorer.export(tmp_path / "view", formats=("svg",))
    assert [p.name for p in files] == ["view.svg", "view_trajectories.svg"]


def test_registry_entry(saved):
    entry = STUDIES["geometry"]
    assert entry.folders() == {m: study.Path("runs/geometry") / m for m in ("smollm2-135m", "gemma3-270m")}
    assert {o.flag for o in entry.options} == {"--prompts", "--prompt-tokens", "--shuffle-prompts", "--windows"}
    same = {"prompts": 6, "prompt_tokens": 40, "shuffle_prompts": 3, "windows": 24}
    assert entry.options_changed(saved, same) == ""
    assert entry.options_changed(saved, {**same, "windows": 400}) == "windows=24"


def test_tokenwise_figure_draws_each_fit_and_a_one_row_legend():
    import xarray as xr

    from workbench.plots.geometry import tokenwise_figure

    fits, effects = {}, {}
    for name, n in (("a", 4), ("b", 3)):
        layers = np.arange(n)
        fits[name] = xr.Dataset({"r2": (("layer", "fit"), np.linspace(0, 1, 2 * n).reshape(n, 2))},
                                coords={"layer": layers, "fit": ["full", "rank 8"]})
        effects[name] = xr.Dataset({"spearman": ("layer", np.linspace(-0.5, 0.5, n))}, coords={"layer": layers},
                                   attrs={"fit": "full"})
    fig = tokenwise_figure(fits, effects, {"a": 4, "b": 3})
    drawn = [t for t in fig.data if t.x[0] is not None]
    assert len(drawn) == 2 * 2 + 2  # two fits and one Spearman line per model
    np.testing.assert_allclose(drawn[1].y, fits["a"].r2.sel(fit="rank 8").values)
    assert all(t.mode == "lines" for t in drawn if "R^2" in t.name)  # no markers on some models' lines only
    assert [t.name for t in fig.data if t.showlegend is not False] == ["a", "b", "full fit", "rank 8 fit"]
