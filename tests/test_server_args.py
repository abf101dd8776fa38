"""What ServerArgs promises: a command line generated from the dataclass, YAML configs that
flags override, and a clear ValueError for every bad value."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from srt.server_args import ServerArgs


def parse(*argv: str) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(list(argv)))


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    return str(path)


# ---- command line -----------------------------------------------------------------------


def settings(args: ServerArgs) -> dict:
    """Every field but the random seed, which each ServerArgs draws anew when not given."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k != "random_seed"}


def test_no_flags_gives_the_defaults():
    assert settings(parse()) == settings(ServerArgs())


def test_random_seed_is_fixed_once_when_not_given():
    # Every TP rank receives these args, so they must already agree on the seed.
    args = ServerArgs()
    assert isinstance(args.random_seed, int)
    assert ServerArgs(random_seed=7).random_seed == 7


@pytest.mark.parametrize("flag", ["--tp", "--tp-size"])
def test_tp_and_tp_size_both_set_tp_size(flag):
    assert parse(flag, "2").tp_size == 2


@pytest.mark.parametrize("flag", ["--model-path", "--model"])
def test_model_path(flag):
    assert parse(flag, "/models/x").model_path == "/models/x"


def test_every_field_has_a_dashed_flag():
    args = parse("--max-prefill-tokens", "4096", "--chunked-prefill-size", "-1", "--mem-fraction-static", "0.5",
                 "--schedule-policy", "lpm", "--host", "0.0.0.0", "--port", "8080", "--log-level", "debug")
    assert (args.max_prefill_tokens, args.chunked_prefill_size, args.schedule_policy) == (4096, -1, "lpm")
    assert args.mem_fraction_static == 0.5 and isinstance(args.mem_fraction_static, float)
    assert (args.host, args.port, args.log_level) == ("0.0.0.0", 8080, "debug")


def test_bools_take_a_flag_and_its_no_form():
    assert parse("--disable-radix-cache").disable_radix_cache is True
    assert parse("--no-disable-radix-cache").disable_radix_cache is False
    assert parse("--trust-remote-code").trust_remote_code is True
    with pytest.raises(SystemExit):
        parse("--disable-radix-cache", "true")


@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--device", "tpu"], ["--schedule-policy", "random"], ["--tp", "two"], ["--port", "1.5"]])
def test_argparse_enforces_choices_and_types(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "invalid" in capsys.readouterr().err


def test_ep_size_must_divide_tp_size():
    assert ServerArgs(tp_size=4, ep_size=2).ep_size == 2
    with pytest.raises(ValueError, match="ep_size=3 must divide tp_size=2"):
        ServerArgs(tp_size=2, ep_size=3)


def test_bad_values_on_the_command_line_raise_value_error():
    with pytest.raises(ValueError, match="mem_fraction_static"):
        parse("--mem-fraction-static", "1.5")


# ---- YAML config ------------------------------------------------------------------------


def test_config_supplies_values_with_dash_or_underscore_keys(tmp_path):
    path = write_yaml(tmp_path, "tp-size: 4\nmodel_path: /m\ndisable-radix-cache: true\ndtype: bfloat16\nmem_fraction_static: 0.7\n")
    args = parse("--config", path)
    assert (args.tp_size, args.model_path, args.disable_radix_cache, args.dtype) == (4, "/m", True, "bfloat16")
    assert args.mem_fraction_static == 0.7


def test_explicit_flags_override_the_config(tmp_path):
    path = write_yaml(tmp_path, "tp_size: 4\nport: 9000\ndisable_radix_cache: true\n")
    args = parse("--tp", "2", "--config", path, "--no-disable-radix-cache")
    assert (args.tp_size, args.port, args.disable_radix_cache) == (2, 9000, False)


def test_an_empty_config_changes_nothing(tmp_path):
    assert settings(parse("--config", write_yaml(tmp_path, ""))) == settings(ServerArgs())


def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="tp_sise"):
        parse("--config", write_yaml(tmp_path, "tp_sise: 2\n"))


def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        parse("--config", write_yaml(tmp_path, "- tp_size\n- 2\n"))


@pytest.mark.parametrize(
    "line, field",
    [
        ('tp_size: "two"', "tp_size"),
        ("tp_size: 2.0", "tp_size"),
        ("tp_size: true", "tp_size"),
        ("tp_size: null", "tp_size"),
        ("disable_radix_cache: 3", "disable_radix_cache"),
        ('disable_radix_cache: "yes"', "disable_radix_cache"),
        ("disable_radix_cache: null", "disable_radix_cache"),
        ("mem_fraction_static: high", "mem_fraction_static"),
        ("mem_fraction_static: true", "mem_fraction_static"),
        ("model_path: 5", "model_path"),
        ("model_path: [a, b]", "model_path"),
        ("port: 0", "port"),
        ("dtype: float8", "dtype"),
        ("schedule_policy: 1", "schedule_policy"),
    ],
)
def test_wrongly_typed_or_invalid_config_values_raise_value_error(tmp_path, line, field):
    with pytest.raises(ValueError, match=field):
        parse("--config", write_yaml(tmp_path, line + "\n"))


def test_config_ints_are_accepted_for_float_fields(tmp_path):
    # The only float field is a fraction, so an int is never in range; what matters is that it
    # reaches the range check as a number instead of failing the type check.
    with pytest.raises(ValueError, match=r"mem_fraction_static must be in \(0, 1\), got 1.0"):
        parse("--config", write_yaml(tmp_path, "mem_fraction_static: 1\n"))
    assert ServerArgs.from_dict({"mem_fraction_static": 0.5, "context_length": None}).mem_fraction_static == 0.5


# ---- direct construction ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"mem_fraction_static": 0.0}, "mem_fraction_static"),
        ({"tp_size": 0}, "tp_size"),
        ({"page_size": 16}, "page_size"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"max_total_tokens": 0}, "max_total_tokens"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
        ({"max_running_requests": 0}, "max_running_requests"),
        ({"context_length": -1}, "context_length"),
        ({"nnodes": 2, "node_rank": 2}, "node_rank"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"schedule_policy": "random"}, "schedule_policy"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ServerArgs(**kwargs)


def test_good_values_are_kept():
    args = ServerArgs(
        model_path="/m", tp_size=2, mem_fraction_static=0.8, dtype="float16", nnodes=2, node_rank=1, dist_init_addr="h:1"
    )
    assert (args.tp_size, args.mem_fraction_static, args.dtype, args.node_rank) == (2, 0.8, "float16", 1)
