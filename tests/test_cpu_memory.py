"""The CPU allocator tuning of ``load_model``: applied for CPU models when its environment variable asks, else not."""

import os
import subprocess
import sys

import pytest

CHECK = "import workbench as wb, workbench.cpu_memory as c; wb.load_model('tiny-random-llama'); print(c._applied)"


def _applied(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_KEEP_CPU_BUFFERS"}
    if env_value is not None:
        env["WORKBENCH_KEEP_CPU_BUFFERS"] = env_value
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is tuned on Linux only")
def test_loading_a_cpu_model_keeps_large_buffers_when_asked():
    assert _applied("1") == "True"  # load_model called it, and glibc took both settings
    assert _applied("0") == "False"
    assert _applied(None) == "False"  # opt-in


def test_nothing_is_tuned_before_a_model_loads():
    done = subprocess.run([sys.executable, "-c", "import workbench, workbench.cpu_memory as c; print(c._applied)"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "None"
