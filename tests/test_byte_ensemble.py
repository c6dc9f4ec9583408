"""The ensemble measured: online mixture weights, bootstrap intervals, held-out splits, the study end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from workbench.analyses.byte_ensemble import (
    ByteLevelEnsemble,
    bits_per_byte_intervals,
    mixture_logprob,
    online_mixture_logprob,
)
from workbench.analyses.byte_level import ByteLevelModel
from workbench.corpus import text_blocks
from workbench.studies import byte_ensemble as study
from workbench.threads import single_thread


def test_online_mixture_on_hand_built_members():
    rng = np.random.default_rng(0)
    lp = np.log(rng.uniform(0.01, 1.0, (3, 40)))
    # Bayesian model averaging telescopes: the whole text's probability is the members' average
    assert online_mixture_logprob(lp).sum() == pytest.approx(logsumexp(lp.sum(axis=1)) - math.log(3), abs=1e-12)
    # the first byte is the equal-weight mixture; share=1 keeps the weights equal all along
    assert online_mixture_logprob(lp)[0] == pytest.approx(mixture_logprob(lp[:, :1], [1, 1, 1])[0])
    np.testing.assert_allclose(online_mixture_logprob(lp, share=1.0), mixture_logprob(lp, [1, 1, 1]), atol=1e-12)
    # a member that is right throughout takes the weight; fixed share follows a best member that changes
    good, bad = math.log(0.9), math.log(0.1)
    switch = np.array([[good] * 50 + [bad] * 50, [bad] * 50 + [good] * 50])
    bayes, shared = online_mixture_logprob(switch), online_mixture_logprob(switch, share=0.05)
    assert bayes[49] == pytest.approx(good, abs=1e-6)
    assert shared[90:].mean() > bayes[90:].mean() and shared.sum() > bayes.sum()
    with pytest.raises(ValueError, match="share"):
        online_mixture_logprob(lp, share=1.5)


def test_bootstrap_intervals_on_known_answers():
    n_bytes = np.full(30, 100)
    same = {"a": np.full(30, 80.0), "ensemble": np.full(30, 72.0)}
    ds = bits_per_byte_intervals(same, n_bytes, "a")
    assert float(ds.bits_per_byte.sel(predictor="a")) == pytest.approx(80 / (100 * math.log(2)))
    assert float(ds.low.sel(predictor="a")) == float(ds.high.sel(predictor="a")) == float(ds.bits_per_byte.sel(predictor="a"))
    assert float(ds.gain.sel(predictor="ensemble")) == pytest.approx(0.1)
    rng = np.random.default_rng(1)
    noisy = {"a": rng.normal(80, 8, 30), "b": rng.normal(85, 8, 30)}
    noisy["ensemble"] = noisy["a"] + rng.normal(0, 4, 30)  # no real gain
    noisy["ensemble, better"] = noisy["a"] * 0.97  # 3% better on every text
    ds = bits_per_byte_intervals(noisy, n_bytes, "best", n_resamples=2000)
    assert ds.attrs["baseline"] == "a"
    assert ((ds.low <= ds.bits_per_byte) & (ds.bits_per_byte <= ds.high)).all()
    assert float(ds.gain_low.sel(predictor="ensemble")) < 0 < float(ds.gain_high.sel(predictor="ensemble"))
    assert float(ds.gain_low.sel(predictor="ensemble, better")) == pytest.approx(0.03, abs=1e-9)
    # four times the texts: the interval of a bits per byte narrows about twofold
    wide = float(ds.high.sel(predictor="b") - ds.low.sel(predictor="b"))
    more = {k: np.tile(v, 4) for k, v in noisy.items()}
    narrow = bits_per_byte_intervals(more, np.tile(n_bytes, 4), n_resamples=2000)
    assert 1.5 < wide / float(narrow.high.sel(predictor="b") - narrow.low.sel(predictor="b")) < 2.7
    with pytest.raises(ValueError, match="at least two texts"):
        bits_per_byte_intervals({"a": [1.0]}, [10])


def test_heldout_splits_are_disjoint_and_leave_the_tuning_text_out():
    config = study.StudyConfig(test_bytes=6000, validation_bytes=1500)
    texts = study.heldout_texts(config)
    assert texts == study.heldout_texts(config)  # seeded
    for domain in ("prose", "code"):
        mine = [t for t in texts if t["domain"] == domain]
        sizes = {s: sum(len(t["text"].encode()) for t in mine if t["split"] == s) for s in ("validation", "test")}
        assert sizes["validation"] >= 1500 and sizes["test"] >= 6000
        bodies = [t["text"] for t in mine]
        assert len(set(bodies)) == len(bodies)  # every text in one split only
    assert all("::=" not in t["text"] for t in texts if t["domain"] == "prose")
    assert any("def " in t["text"] for t in texts if t["domain"] == "code")
    assert f"pydoc:{study._tuning_document()}" not in {t["source"] for t in texts}
    with pytest.raises(ValueError, match="blocks hold .* lower test_bytes"):
        study.heldout_texts(study.StudyConfig(test_bytes=10**6))
    assert sum(len(t.encode()) for _, t in text_blocks("code")) > 60_000


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, tiny, smollm2):
    config = study.StudyConfig(test_bytes=600, validation_bytes=100, max_hypotheses=4, n_resamples=500,
                               weight_step=0.25, shares=(0.0, 0.05))
    folder = tmp_path_factory.mktemp("byte_ensemble") / "study"
    study.run_study(folder, config, handles={"tiny": tiny, "smollm2": smollm2}, progress=False)
    return folder, config


def test_study_end_to_end_against_the_ensemble_class(small_study, tiny, smollm2):
    folder, config = small_study
    ds = study.load_study(folder)
    assert ds["member"].values.tolist() == [tiny.name, smollm2.name]
    texts = json.loads(ds.attrs["texts"])
    test = [i for i in range(len(texts)) if ds["split"].values[i] == "test" and ds["domain"].values[i] == "code"]
    kwargs = dict(prune=config.prune, max_hypotheses=config.max_hypotheses)
    with single_thread():
        streams = [ByteLevelEnsemble([ByteLevelModel(tiny, **kwargs), ByteLevelModel(smollm2, **kwargs)]).stream(
            texts[i], progress=False) for i in test]
    for i, s in zip(test, streams):
        np.testing.assert_allclose(ds["logprob"].values[:, ds["text_of_byte"].values == i], s.member_logprob, atol=1e-5)
    ev = study.evaluate(ds)
    code = ev.sel(domain="code")
    n = sum(len(texts[i].encode()) for i in test)
    equal = np.concatenate([s.logprob.values for s in streams])  # the ensemble class mixes the distributions
    assert float(code.bits_per_byte.sel(predictor="ensemble, equal weights")) == pytest.approx(
        -equal.sum() / (n * math.log(2)), rel=1e-5)
    member_bits = [-np.concatenate([s.member_logprob.values[j] for s in streams]).sum() / (n * math.log(2)) for j in (0, 1)]
    np.testing.assert_allclose(code.bits_per_byte.sel(predictor=[tiny.name, smollm2.name]), member_bits, rtol=1e-5)
    assert str(code.baseline.values) == smollm2.name  # the trained model beats the random one
    assert float(code.gain.sel(predictor=smollm2.name)) == 0.0
    assert ((ev.low <= ev.bits_per_byte + 1e-12) & (ev.bits_per_byte <= ev.high + 1e-12)).all()
    assert float(ev.share.sel(domain="prose")) in config.shares
    np.testing.assert_allclose(ev.weight.sel(domain="prose").sum(), 1.0)
    assert int(ev.test_bytes.sel(domain="both")) == int(ev.test_bytes.sel(domain=["prose", "code"]).sum())


def test_study_summary_and_figure(small_study, tmp_path):
    folder, _ = small_study
    page = study.write_summary(folder, tmp_path / "byte_ensemble.md").read_text()
    assert "ensemble, online weights" in page and "**prose**, against" in page and "bootstrap" in page
    written = study.write_figures(folder, tmp_path, formats=("svg",))
    assert [p.name for p in written] == ["ensemble_intervals.svg"]
    fig = __import__("workbench.plots.byte_level", fromlist=["x"]).ensemble_intervals_figure(study.evaluate(study.load_study(folder)))
    assert len(fig.data) == 6 and all(t.error_x.array is not None for t in fig.data)


_SCORE = study._score


class Stopped(Exception):
    pass


def _counting(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count the texts the study scores (by patching its scorer); raise after ``fail_after`` chunks, like a kill."""
    scored = []

    def counted(model, texts, *args):
        if fail_after is not None and len(scored) >= fail_after:
            raise Stopped
        scored.append(len(texts))
        return _SCORE(model, texts, *args)

    monkeypatch.setattr(study, "_score", counted)
    monkeypatch.setattr(study, "_CHUNK_BYTES", 100)  # several chunks of the small study
    return scored


SMALL = study.StudyConfig(test_bytes=400, validation_bytes=100, max_hypotheses=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("uninterrupted") / "study"
    study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)
    return study.load_study(folder)


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch, tiny, uninterrupted):
    folder = tmp_path / "study"
    n_texts = len(study.heldout_texts(SMALL))
    scored = _counting(monkeypatch, fail_after=2)
    with pytest.raises(Stopped):
        study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)
    store = study.TextScores(folder)
    assert not folder.exists() and store.count() == sum(scored) > 0  # kept: every text scored before the stop
    records = sorted(store.root.glob("*/*.npz"))
    records[0].write_bytes(b"damaged")  # read back as missing: scored again
    (records[0].parent / ".half.npz.tmp").write_bytes(b"")  # a write the kill interrupted
    kept = store.count() - 1
    scored = _counting(monkeypatch)
    study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)
    assert sum(scored) == n_texts - kept
    ds = study.load_study(folder)
    np.testing.assert_array_equal(ds["logprob"].values, uninterrupted["logprob"].values)
    np.testing.assert_array_equal(ds["renormalised_logmass"].values, uninterrupted["renormalised_logmass"].values)
    assert int(ds["scored_here"].sum()) == n_texts - kept and np.isfinite(ds["seconds"].values).all()
    assert not store.root.exists()  # the saved study holds every score


def test_more_test_bytes_score_only_the_new_texts(tmp_path, monkeypatch, tiny, uninterrupted):
    import dataclasses

    from workbench.studies.registry import STUDIES

    folder = tmp_path / "study"
    fewer = dataclasses.replace(SMALL, test_bytes=300)
    study.run_study(folder, fewer, handles={"tiny": tiny}, progress=False)
    entry = dataclasses.replace(STUDIES["byte-ensemble"], folder=folder)
    assert entry.options_changed(folder, {"test_bytes": 300}) == ""
    assert entry.options_changed(folder, {"test_bytes": 400}) == "test_bytes=300"
    runs, said = [], []
    dataclasses.replace(entry, run=lambda *a: runs.append(a)).run_missing(None, {"test_bytes": 400}, False, said.append)
    assert runs == [(None, folder, {"test_bytes": 400}, False)] and "were made with test_bytes=300" in said[0]

    old = {t["text"] for t in study.heldout_texts(fewer)}
    new = [t for t in study.heldout_texts(SMALL) if t["text"] not in old]
    scored = _counting(monkeypatch)
    with pytest.raises(Exception, match="already holds a study"):
        study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)
    study.run_study(folder, SMALL, handles={"tiny": tiny}, overwrite=True, progress=False)
    assert sum(scored) == len(new) > 0
    ds = study.load_study(folder)
    np.testing.assert_array_equal(ds["logprob"].values, uninterrupted["logprob"].values)
    assert int(ds["scored_here"].sum()) == len(new) and "came from earlier runs of the study" in study._cost(ds)
    scored.clear()
    study.run_study(folder, SMALL, handles={"tiny": tiny}, overwrite=True, reuse=False, progress=False)
    assert sum(scored) == ds.sizes["text"]  # reuse=False (--recompute) scores every text again
    assert bool(study.load_study(folder)["scored_here"].all())


def test_another_model_of_the_same_name_never_gets_its_scores(tmp_path, monkeypatch, tiny, uninterrupted):
    """Two checkpoints called alike (a re-initialised tiny-random-llama here): neither the records of an interrupted
    run nor a saved study of one are reused for the other; the weights' hash tells them apart."""
    from workbench.models.tiny import tiny_model

    other = tiny_model("llama", seed=1)
    assert other.name == tiny.name and other.file_hash != tiny.file_hash
    folder = tmp_path / "study"
    n_texts = len(study.heldout_texts(SMALL))
    scored = _counting(monkeypatch, fail_after=2)
    with pytest.raises(Stopped):
        study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)
    assert study.TextScores(folder).count() > 0
    scored = _counting(monkeypatch)
    study.run_study(folder, SMALL, handles={"other": other}, progress=False)
    assert sum(scored) == n_texts  # the other weights' records were not taken
    ds = study.load_study(folder)
    assert list(ds["weights"].values) == [f"{other.file_hash} {other.dtype}"]
    assert not np.array_equal(ds["logprob"].values, uninterrupted["logprob"].values)
    scored.clear()
    study.run_study(folder, SMALL, handles={"tiny": tiny}, overwrite=True, progress=False)
    assert sum(scored) == n_texts  # nor a saved study's
    np.testing.assert_array_equal(study.load_study(folder)["logprob"].values, uninterrupted["logprob"].values)


def test_a_study_killed_mid_run_resumes(tmp_path, tiny, uninterrupted):
    """SIGKILL a real process running the study once it has kept two texts; the rerun finishes it, equal to a run
    never interrupted."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "study"
    store = study.TextScores(folder)
    script = ("import workbench as wb; from workbench.studies import byte_ensemble as s; s._CHUNK_BYTES = 100; "
              f"s.run_study({str(folder)!r}, s.StudyConfig(**{dataclasses.asdict(SMALL)!r}), "
              "handles={'tiny': wb.load_model('tiny-random-llama')}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 300
    while store.count() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = store.count()
    assert 2 <= kept < uninterrupted.sizes["text"] and not folder.exists()
    study.run_study(folder, SMALL, handles={"tiny": tiny}, progress=False)  # the killed run's lock is gone with it
    ds = study.load_study(folder)
    np.testing.assert_array_equal(ds["logprob"].values, uninterrupted["logprob"].values)
    assert int((~ds["scored_here"]).sum()) == kept and not store.root.exists()


def test_the_score_records_never_delete_a_folder_they_did_not_write(tmp_path):
    store = study.TextScores(tmp_path / "study")
    store.root.mkdir()
    (store.root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by the workbench"):
        store.clear()
    assert (store.root / "notes.txt").read_text() == "mine"
    (store.root / "notes.txt").unlink()
    store.put("m", {"prune": 0.0}, "ab", {"logprob": [-1.0, -2.0], "renormalised": 0.0, "seconds": 1.0, "calls": 1,
                                          "positions": 2})
    np.testing.assert_array_equal(store.get("m", {"prune": 0.0}, "ab")["logprob"], [-1.0, -2.0])
    assert store.get("m", {"prune": 1e-4}, "ab") is None and store.get("m", {"prune": 0.0}, "ac") is None
    store.clear()
    assert not store.root.exists()
