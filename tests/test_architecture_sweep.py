"""The architecture sweep (scripts/sweep_architectures.py) on a fixed sample: each type is
served token-exact against transformers, or refused with the reason named.

The sample covers an MoE type with attention sinks, sliding-window layers passed as a
keyword and as None for full layers, a hybrid model (refused: no recurrent-state pool), and
the two ways a layer can defeat one K/V entry per layer and token (refused). Each type runs
in its own subprocess, two at a time. (Types served token-exact elsewhere stay out of it:
DeepSeek-V3, Mixtral, Qwen2/3-MoE and OLMoE in test_model_loading.py, gpt-oss in test_parity.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import psutil

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from sweep_architectures import _TAG, kill_tree, sweep  # noqa: E402

EXPECTED: dict[str, tuple[str, str]] = {
    "granitemoe_swa": ("ok", ""),  # sinks (as a post-softmax scale in transformers), sliding window
    "exaone4": ("ok", ""),  # sliding_window=None passed for its full-attention layers
    "qwen3_next": ("refused", "no per-request recurrent-state pool"),
    "diffllama": ("refused", "calls attention 2 times in layer 0"),
    "moshi": ("refused", "keeps only the last sliding_window=6 tokens"),
}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {r["model_type"]: r for r in sweep(sorted(EXPECTED), jobs=2, timeout=240)}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_sweep_outcome(results: dict[str, dict], model_type: str) -> None:
    outcome, reason = EXPECTED[model_type]
    got = results[model_type]
    assert got["outcome"] == outcome, got
    assert reason in got.get("reason", ""), got


def test_kill_tree_leaves_no_process_behind() -> None:
    """A type's subprocess whose children run in sessions of their own (as the Engine's do), one
    of them orphaned: every one of them is gone after ``kill_tree``."""
    tag = uuid.uuid4().hex
    grandchild = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)"
    orphan = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True); subprocess.run([sys.executable, '-c', {orphan!r}]); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env={**os.environ, _TAG: tag})

    def tagged() -> list[int]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(_TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found

    deadline = time.time() + 30
    while len(tagged()) < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert len(tagged()) == 4
    kill_tree(child, tag)
    assert tagged() == []
