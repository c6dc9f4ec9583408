"""The workbench command, in-process."""

import pytest
from typer.testing import CliRunner

import workbench as wb
from workbench.cli import app

runner = CliRunner()


def test_models_lists_the_embedded_models():
    result = runner.invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("smollm2-135m", "gemma3-270m", "tiny-random-llama"):
        assert name in result.output


def test_capture_writes_a_run_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run.zarr"
    args = ["capture", "--model", "tiny-random-llama", "--out", str(out), "--limit", "3", "--probes", "resid_pre,logits"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = wb.open_run(out)
    assert run.sizes["sample"] == 3 and run.attrs["probes"] == "resid_pre,logits"
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


def test_capture_from_a_text_file(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("First paragraph of my notes.\n\nSecond one, a little longer than the first.\n")
    out = tmp_path / "notes.nc"
    result = runner.invoke(app, ["capture", "--model", "tiny-random-llama", "--corpus", str(corpus), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert wb.open_run(out).sizes["sample"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--probes", "resid,logits"], "Valid probes"),
        (["--model", "no-such-model"], "Unknown model 'no-such-model'"),
        (["--model", "someone/some-model"], "allow_download"),
        (["--corpus", "/nonexistent/corpus.txt"], "does not exist"),
        (["--backend", "jax"], "transformer_lens"),
        (["--limit", "-1"], "--limit must be 0"),
        (["--model", " "], "--model is empty"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--residual-dtype", "bfloat16"], "float16"),
    ],
)
def test_capture_bad_input_is_one_clear_line(tmp_path, args, message):
    base = ["capture", "--model", "tiny-random-llama", "--out", str(tmp_path / "r.zarr")]
    result = runner.invoke(app, base + args, terminal_width=300)
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.zarr").exists()


def test_gallery_without_a_run_says_what_to_do(tmp_path):
    result = runner.invoke(app, ["gallery", "--run", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1 and "workbench demo" in result.output


@pytest.mark.real
def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--samples", "3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run = wb.open_run("runs/demo.zarr", lazy=False)
    assert run.attrs["model"] == "smollm2-135m" and run.sizes["sample"] == 3
    assert 1.0 < float(-run.next_token_logprob.mean()) < 4.5  # a real, working model on English prose
    assert len(list((tmp_path / "gallery").glob("*.png"))) == 3
    assert "nats/token" in result.output
    again = runner.invoke(app, ["demo", "--samples", "3"], terminal_width=200)  # idempotent
    assert again.exit_code == 0 and "replacing runs/demo.zarr" in again.output


def test_lab_serves_the_notebooks_on_loopback_only():
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "lab", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        else:
            pytest.fail("JupyterLab did not start within 90 s")
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        ours = [line for line in listening.splitlines() if f":{port} " in line]
        assert ours and all("127.0.0.1" in line for line in ours), ours
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_capture_checks_the_output_path_before_loading_any_model(tmp_path, monkeypatch):
    import workbench as wb

    monkeypatch.setattr(wb, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    result = runner.invoke(app, ["capture", "--model", "tiny-random-llama", "--out", str(tmp_path / "x.h5")],
                           terminal_width=300)
    assert result.exit_code == 1 and ".zarr" in result.output


def test_malformed_jsonl_names_the_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = runner.invoke(app, ["capture", "--model", "tiny-random-llama", "--corpus", str(corpus),
                                 "--out", str(tmp_path / "r.zarr")], terminal_width=300)
    assert result.exit_code == 1 and "line 2" in result.output and "Traceback" not in result.output


def test_second_capture_into_the_same_run_is_refused_before_loading(tmp_path, monkeypatch):
    import workbench as wb

    from .conftest import lock_held_elsewhere

    out = tmp_path / "r.zarr"
    with lock_held_elsewhere(out) as pid:
        monkeypatch.setattr(wb, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        result = runner.invoke(app, ["capture", "--model", "tiny-random-llama", "--out", str(out)],
                               terminal_width=300)
        assert result.exit_code == 1 and f"pid {pid}" in " ".join(result.output.split())


def test_plan_prints_size_memory_and_time(tmp_path):
    result = runner.invoke(app, ["plan", "--model", "tiny-random-llama", "--limit", "4", "--truncate",
                                 "--probes", "resid_pre,attn_received", "--out", str(tmp_path / "r.zarr")],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "run size" in result.output and "peak memory" in result.output and "time: about" in result.output
    assert not (tmp_path / "r.zarr").exists()


def test_version_and_help_load_no_heavy_library():
    """`workbench --help` and `--version` import neither torch, transformers nor xarray (they made --help
    take seconds); the version is the installed package's."""
    import subprocess
    import sys
    from importlib.metadata import version

    code = ("import sys; from workbench.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'xarray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"workbench {version('workbench')}"


def test_help_shows_switches_as_switches_and_values_by_name():
    result = runner.invoke(app, ["capture", "--help"], terminal_width=120)
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "<str>" not in result.output and "<int>" not in result.output
    assert "--truncate" in result.output and "--no-truncate" in result.output
    line = next(line for line in result.output.splitlines() if "--batch-size" in line)
    assert " N " in line
    study = runner.invoke(app, ["geometry", "--help"], terminal_width=120).output
    assert "--no-recompute" in study and "<" not in study


def test_models_table_fits_80_columns():
    result = runner.invoke(app, ["models"], terminal_width=80)
    assert result.exit_code == 0
    assert max(map(len, result.output.splitlines())) <= 80
    assert "…" not in result.output  # nothing cut
    assert "smollm2-135m:" in result.output  # the descriptions, below the table
