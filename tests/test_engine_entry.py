"""How the Engine starts: from a plain script with no main guard, on a model folder without a
tokenizer (token ids only, with ``skip_tokenizer_init``), and with concurrent control calls
over data-parallel replicas, each answered with its own replies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import srt
from tiny_models import build_tiny_model, load_reference, reference_greedy


def _without_tokenizer(directory: Path) -> str:
    build_tiny_model("llama", str(directory))
    for path in directory.iterdir():
        if "token" in path.name:  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
            path.unlink()
    return str(directory)


def test_a_script_without_a_main_guard_runs(tmp_path: Path) -> None:
    """As the SGLang snippet in the transformers docs does: ``Engine(...)`` at module top level."""
    model_dir = build_tiny_model("llama", str(tmp_path / "model"))
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import srt

            llm = srt.Engine(model_path={model_dir!r}, dtype="float32", max_total_tokens=256)
            out = llm.generate(input_ids=[5, 6, 7], sampling_params={{"temperature": 0, "max_new_tokens": 4}})
            print("OUTPUT", out["output_ids"])
            llm.shutdown()
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = reference_greedy(load_reference(model_dir), [5, 6, 7], 4)
    assert f"OUTPUT {expected}" in done.stdout


def test_skip_tokenizer_init_serves_token_ids_from_a_folder_without_tokenizer(tmp_path: Path) -> None:
    model_dir = _without_tokenizer(tmp_path)
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=256, skip_tokenizer_init=True) as engine:
        assert engine.tokenizer is None and "detokenizer" not in engine.runtime.processes
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True})
        assert out["output_ids"] == reference_greedy(load_reference(model_dir), [5, 6, 7], 6)
        assert "text" not in out  # there is no text to give, rather than a wrong one
        streamed = list(engine.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 6}, stream=True))
        assert [t for item in streamed for t in item["output_ids"]] == out["output_ids"]
        with pytest.raises(ValueError, match="skip-tokenizer-init"):
            engine.generate("some text", {"max_new_tokens": 2})
        with pytest.raises(ValueError, match="stop strings need a tokenizer"):
            engine.generate(input_ids=[5, 6], sampling_params={"stop": ["x"]})


def test_a_folder_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = _without_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="--tokenizer-path.*--skip-tokenizer-init"):
        srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=256)


def test_concurrent_control_calls_get_their_own_replies_with_dp2(tmp_path: Path) -> None:
    model_dir = build_tiny_model("llama", str(tmp_path))
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=256, dp_size=2) as engine:
        tm = engine.tokenizer_manager

        async def both() -> tuple:
            return await asyncio.gather(*(call() for _ in range(8) for call in (tm.get_replica_states, tm.flush_cache)))

        replies = engine._call(both())
        states, flushes = replies[0::2], replies[1::2]
        assert all(len(s) == 2 and all(type(r).__name__ == "InternalState" for r in s) for s in states)
        assert all(f is True for f in flushes)
        assert not tm._replies  # nothing left waiting


def test_children_never_see_the_api_key_on_their_command_line(tmp_path: Path) -> None:
    import psutil

    model_dir = build_tiny_model("llama", str(tmp_path))
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=256, api_key="sk-secret") as engine:
        for proc in engine.runtime.processes.values():
            assert "sk-secret" not in " ".join(psutil.Process(proc.pid).cmdline())
            assert os.getpid() == psutil.Process(proc.pid).ppid()


def test_a_new_server_removes_the_sockets_of_one_that_was_killed(tmp_path: Path) -> None:
    from srt.runtime.ipc import remove_stale_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = tmp_path / f"srt-ipc-{dead_pid}-abc"
    live = tmp_path / f"srt-ipc-{os.getpid()}-def"
    other = tmp_path / "srt-ipc-notapid"
    for path in (stale, live, other):
        path.mkdir()
    remove_stale_dirs(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
