"""The model loader serves checkpoints the way transformers itself loads them.

Promised here:

* A checkpoint sharded over several ``model-0000x-of-0000y.safetensors`` files (with a
  ``model.safetensors.index.json``) is loaded whole: srt's greedy output equals
  transformers' own greedy generate. This holds too when the model ties its output
  embedding to its input embedding, so that the checkpoint has no ``lm_head.weight``.
* A checkpoint in the hub's layout rather than the model's (one tensor per MoE expert
  where the model holds all experts of a layer in one fused 3-D parameter, Mixtral's
  ``block_sparse_moe.experts.N.w1``, GPT-NeoX's ``embed_out``) is converted the way
  transformers converts it, and generates what transformers generates. That layout is
  what ``save_pretrained`` writes.
* A quantized checkpoint (``quantization_config`` in config.json) is refused at start, with
  the quantization method named: srt implements none, and reading packed weights as plain
  ones would be garbage.
* A model whose code lives in its own folder (``auto_map`` in config.json) is served with
  ``trust_remote_code=True``, exactly like the architecture it is built from; without
  ``trust_remote_code`` the Engine refuses to start and says that the option is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import dynamic_module_utils

import srt
from srt.model_loader.loader import safetensors_files
from test_parity import assert_greedy_equal, make_prompts
from tiny_models import CONVERTED_ARCHITECTURES, build_tiny_model, byte_tokenizer, load_reference, reference_greedy

PROMPTS = [[5, 77, 200, 31, 9, 140, 66], [250, 3, 18]]
MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


def srt_greedy(model_dir: str, **engine_args: object) -> list[list[int]]:
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=512, **engine_args) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    return [out["output_ids"] for out in outs]


# ---- sharded checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("tie_word_embeddings", [False, True], ids=["untied", "tied"])
def test_sharded_checkpoint_generates_like_transformers(tmp_path: Path, tie_word_embeddings: bool) -> None:
    single_file_dir = build_tiny_model("llama", str(tmp_path / "single"), tie_word_embeddings=tie_word_embeddings)
    reference = load_reference(single_file_dir)
    model_dir = str(tmp_path / "sharded")
    reference.save_pretrained(model_dir, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(model_dir)

    shards = sorted(name for name in os.listdir(model_dir) if name.endswith(".safetensors"))
    assert len(shards) > 2 and all(name.startswith("model-0000") for name in shards)
    assert [os.path.basename(path) for path in safetensors_files(model_dir)] == shards
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    # A tied model stores the embedding once; the loader must point the LM head at it.
    assert ("lm_head.weight" in weight_map) != tie_word_embeddings

    expected = [reference_greedy(reference, prompt, MAX_NEW) for prompt in PROMPTS]
    assert srt_greedy(model_dir) == expected


# ---- checkpoints that transformers converts --------------------------------------------


@pytest.mark.parametrize("model_type", sorted(CONVERTED_ARCHITECTURES))
def test_converted_checkpoint_generates_like_transformers(tmp_path: Path, model_type: str) -> None:
    model_dir = build_tiny_model(model_type, str(tmp_path))
    reference = load_reference(model_dir)
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    # Model tensors that the checkpoint does not hold under their own name: only a loader
    # that applies transformers' conversion finds them.
    assert set(reference.state_dict()) - stored

    prompts = make_prompts()
    expected = [reference_greedy(reference, prompt, MAX_NEW) for prompt in prompts]
    with srt.Engine(model_path=model_dir, dtype="float32", max_total_tokens=1024, max_prefill_tokens=40) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    for prompt, out, want in zip(prompts, outs, expected):
        assert_greedy_equal(reference, prompt, out["output_ids"], want)


@pytest.mark.parametrize(
    ("dropped", "refusal"),
    [
        # Three experts stacked where the model has four: refused, not loaded shifted.
        (r"layers\.0\..*experts\.3\.w2\.", r"experts\.down_proj: has shape \[3, 64, 32\], the model's is \[4, 64, 32\]"),
        (r"layers\.0\..*experts\.\d+\.w2\.", r"lacks weights for 1 parameters.*layers\.0\.mlp\.experts\.down_proj"),
    ],
    ids=["one-expert", "all-experts"],
)
def test_checkpoint_missing_experts_is_refused(tmp_path: Path, dropped: str, refusal: str) -> None:
    model_dir = build_tiny_model("mixtral", str(tmp_path))
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    save_file({key: t for key, t in tensors.items() if not re.search(dropped, key)}, path, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=refusal):
        srt_greedy(model_dir)


# ---- quantized checkpoints ----------------------------------------------------------------


def test_quantized_checkpoint_is_refused_naming_its_method(tmp_path: Path) -> None:
    model_dir = build_tiny_model("llama", str(tmp_path))
    config_path = Path(model_dir, "config.json")
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config_path.write_text(json.dumps(config, indent=2))
    refusal = r"quantization method 'fp8' \(quantization_config in config.json\) is not supported by srt"
    with pytest.raises(RuntimeError, match=refusal):
        srt_greedy(model_dir)


# ---- trust_remote_code ------------------------------------------------------------------

CONFIGURATION_TINY = """\
from transformers.models.llama.configuration_llama import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny_remote"
"""

MODELING_TINY = """\
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


@pytest.fixture(scope="module")
def llama_and_remote_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A plain tiny llama, and a copy of it whose config and model classes are its own code."""
    llama_dir = build_tiny_model("llama", str(tmp_path_factory.mktemp("llama")))
    remote_dir = str(tmp_path_factory.mktemp("remote") / "tiny_remote")
    shutil.copytree(llama_dir, remote_dir)
    Path(remote_dir, "configuration_tiny.py").write_text(CONFIGURATION_TINY)
    Path(remote_dir, "modeling_tiny.py").write_text(MODELING_TINY)
    config_path = Path(remote_dir, "config.json")
    config = json.loads(config_path.read_text())
    config.update(
        model_type="tiny_remote",
        architectures=["TinyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
    )
    config_path.write_text(json.dumps(config, indent=2))
    return llama_dir, remote_dir


@pytest.fixture
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private HF_MODULES_CACHE, where transformers copies a folder's code to import it.

    The Engine's children read it from the environment; this process (which loads the
    tokenizer, and with it the config) read it when transformers was imported, so it is
    patched here too, with the import path and the ``transformers_modules`` package that
    the cache provides put back afterwards.
    """
    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [name for name in sys.modules if name.partition(".")[0] == "transformers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    yield cache
    for name in [name for name in sys.modules if name.partition(".")[0] == "transformers_modules"]:
        del sys.modules[name]


def test_remote_code_model_generates_like_the_architecture_it_wraps(
    llama_and_remote_dirs: tuple[str, str], modules_cache: Path
) -> None:
    llama_dir, remote_dir = llama_and_remote_dirs
    reference = load_reference(llama_dir)
    expected = [reference_greedy(reference, prompt, MAX_NEW) for prompt in PROMPTS]
    assert srt_greedy(remote_dir, trust_remote_code=True) == expected
    assert list(modules_cache.rglob("modeling_tiny.py")), "transformers did not import the folder's own code"


def test_remote_code_model_needs_trust_remote_code(
    llama_and_remote_dirs: tuple[str, str], modules_cache: Path
) -> None:
    _, remote_dir = llama_and_remote_dirs
    with pytest.raises(RuntimeError, match="trust_remote_code=True"):
        srt_greedy(remote_dir)
