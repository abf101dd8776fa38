"""The grammar backends on their own: compile, walk, mask, terminate, refuse; and the
constraint fields of SamplingParams. The byte tokenizer makes token t the byte t."""

from __future__ import annotations

import json

import pytest
import torch

from srt.kernels import cpu_kernels
from srt.sampling.grammar.backend import GrammarError, GrammarKey, apply_bitmask, create_grammar_backend
from srt.sampling.sampling_params import SamplingParams
from tiny_models import byte_tokenizer

EOS = 2
BACKENDS = ["xgrammar", "llguidance"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return create_grammar_backend(request.param, byte_tokenizer(), 256, [EOS], any_whitespace=True)


def _walk(backend, kind: str, text: str, data: bytes) -> list[bool]:
    matcher = backend.matcher(backend.compile(GrammarKey(kind, text)), [EOS])
    return [matcher.accept(b) for b in data]


def _allowed(backend, kind: str, text: str, prefix: bytes) -> set[int]:
    matcher = backend.matcher(backend.compile(GrammarKey(kind, text)), [EOS])
    assert all(matcher.accept(b) for b in prefix)
    bitmask = backend.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, 256)
    apply_bitmask(logits, bitmask, [0])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_json_schema_walk_mask_and_termination(backend):
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]})
    assert all(_walk(backend, "json_schema", schema, b'{"n": 7}'))
    assert _allowed(backend, "json_schema", schema, b'{"n": ') == set(b"0123456789 \t\n\r")  # any whitespace, by default
    assert _allowed(backend, "json_schema", schema, b'{"n": 7}') == {EOS}  # only the end may follow
    matcher = backend.matcher(backend.compile(GrammarKey("json_schema", schema)), [EOS])
    for b in b'{"n": 7}':
        matcher.accept(b)
    assert not matcher.is_terminated()
    assert matcher.accept(EOS) and matcher.is_terminated()


def test_a_token_outside_the_grammar_is_refused(backend):
    assert _walk(backend, "regex", "ab+c", b"ax") == [True, False]


def test_strings_never_hold_raw_control_characters(backend):
    """RFC 8259 wants U+0000-U+001F escaped; xgrammar's length-bounded strings let them through
    unless srt rewrites the rule."""
    for schema in ({"type": "string"}, {"type": "string", "maxLength": 5}, {"type": "string", "minLength": 1}):
        allowed = _allowed(backend, "json_schema", json.dumps(schema), b'"a')
        assert not allowed & set(range(0x20)), schema
        assert ord("b") in allowed and ord('"') in allowed


def test_regex_and_ebnf(backend):
    assert _allowed(backend, "regex", "(cat|dog)s?", b"ca") == {ord("t")}
    grammar = 'root ::= item ("," item)*\nitem ::= "yes" | "no"'
    assert all(_walk(backend, "ebnf", grammar, b"yes,no,no"))
    assert _allowed(backend, "ebnf", grammar, b"yes,") == {ord("y"), ord("n")}


@pytest.mark.parametrize("kind, text", [("regex", "(unclosed"), ("ebnf", "root ::= nowhere"), ("json_schema", '{"type": "objekt"}')])
def test_what_does_not_compile_is_a_grammar_error_with_the_libraries_message(backend, kind, text):
    with pytest.raises(GrammarError) as error:
        backend.compile(GrammarKey(kind, text))
    assert str(error.value) and ".cc:" not in str(error.value)


def test_apply_bitmask_touches_only_the_listed_rows():
    backend = create_grammar_backend("xgrammar", byte_tokenizer(), 256, [EOS], any_whitespace=True)
    bitmask = backend.allocate_bitmask(3)
    bitmask[1] = 0
    bitmask[1, 0] = 0b1010  # tokens 1 and 3
    logits = torch.zeros(3, 256)
    apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    assert set(torch.nonzero(torch.isfinite(logits[1])).flatten().tolist()) == {1, 3}


def test_sampling_params_take_one_constraint():
    assert SamplingParams.from_dict({"json_schema": {"type": "object"}}).constraint == ("json_schema", '{"type": "object"}')
    assert SamplingParams.from_dict({"regex": "a+"}).constraint == ("regex", "a+")
    assert SamplingParams.from_dict({}).constraint is None
    for bad, message in (
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "only one of"),
        ({"json_schema": "{"}, "not valid JSON"),
        ({"regex": ""}, "must not be empty"),
        ({"ebnf": 5}, "ebnf must be"),
    ):
        with pytest.raises(ValueError, match=message):
            SamplingParams.from_dict(bad)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler")
@pytest.mark.parametrize("allowed_words", [0.0, 0.05, 0.5, 1.0])
def test_the_cpu_kernel_masks_as_xgrammar_does(allowed_words):
    """srt's C kernel against xgrammar's own, on masks of whole allowed, whole disallowed and
    mixed words, every row or some, a vocabulary that is not a multiple of 32."""
    import xgrammar

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 6, 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    whole = torch.rand(bitmask.shape, generator=generator)
    bitmask[whole < allowed_words] = -1
    bitmask[whole > 1 - (1 - allowed_words) / 2] = 0
    logits = torch.randn(rows, vocab, generator=generator)
    for subset in (list(range(rows)), [1, 4]):
        ours, theirs = logits.clone(), logits.clone()
        cpu_kernels.apply_token_bitmask(ours, bitmask, subset)
        xgrammar.apply_token_bitmask_inplace(theirs, bitmask, indices=subset)
        assert torch.equal(ours, theirs)
