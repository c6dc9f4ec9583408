"""The tokenizer study on a folder holding only a tokenizer (what a researcher passes with --model PATH),
supported or not: the parts that need no weights run, the rest say why they were skipped."""

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import workbench as wb
from workbench.studies import tokenizers as study
from workbench.studies.registry import STUDIES


def test_tokenizer_only_folder(tmp_path):
    folder = tmp_path / "my-tokenizer"
    wb.load_tokenizer("smollm2-135m").save_pretrained(folder)
    said = []
    study.run_study(str(folder), tmp_path / "out", say=said.append)
    saved = study.load_study(tmp_path / "out")
    assert saved["summary"]["model"] is False and "loss_nats" not in saved["fairness"]
    assert saved["digits"].attrs["rule"] == "single digits"
    assert int((saved["undertrained"].category == "partial_utf8").sum()) == 313
    assert "sums" not in saved
    written = study.write_figures({"my-tokenizer": tmp_path / "out"}, tmp_path / "gallery", formats=("svg",))
    assert {p.name for p in written} == {"premium_heatmap.svg", "premium_bars.svg"}
    table = study.write_page({"my-tokenizer": tmp_path / "out"}, tmp_path, tmp_path / "page.md")
    assert "my-tokenizer" in table and "single digits" in table
    entry = STUDIES["tokenizers"]  # the options are saved with the study; a rerun with others says which differ
    assert entry.options_changed(tmp_path / "out", {"loss_articles": 5, "verify_max": 600, "sum_problems": 20}) == ""
    assert entry.options_changed(tmp_path / "out", {"loss_articles": 5, "verify_max": 60, "sum_problems": 20}) \
        == "verify_max=600"
    study.run_study(str(folder), tmp_path / "out", study.StudyConfig(verify_max=60), overwrite=True, say=said.append)
    assert entry.options_changed(tmp_path / "out", {"verify_max": 60}) == ""  # replaced whole, through .partial
    assert not (tmp_path / "out.partial").exists()


def test_wordpiece_tokenizer_is_skipped_where_it_cannot_be_read(tmp_path):
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789")},
             **{f"##{c}": 40 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789")}}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "wordpiece")
    said = []
    study.run_study(str(tmp_path / "wordpiece"), tmp_path / "out", say=said.append)
    assert any("no token categories" in s for s in said)
    saved = study.load_study(tmp_path / "out")
    assert int(saved["fairness"].tokens.sel(language="eng").sum()) > 0


def test_study_folders_for_paths_stay_under_the_study_folder():
    folders = STUDIES["tokenizers"].folders(["/some/where/my-model", "smollm2-135m"])
    assert folders["/some/where/my-model"] == Path("runs/tokenizers/my-model")
    assert folders["smollm2-135m"] == Path("runs/tokenizers/smollm2-135m")
