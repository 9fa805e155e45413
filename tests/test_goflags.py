"""proxy.goflags: the parsing rules and error texts of Go's `flag` package.

Scripts written for `consul connect proxy` must parse the same way here, errors included.
"""

from __future__ import annotations

import pytest

from proxy.goflags import FlagError, FlagSet, HelpRequested, parse_bool


def make_flags(seen: list[str] | None = None) -> FlagSet:
    """A small flag set shaped like the proxy's: strings, a bool and a repeatable flag."""
    fs = FlagSet()
    fs.string("service", "", "service name")
    fs.string("listen", "", "listen address")
    fs.boolean("register", False, "self-register")

    def on_upstream(value: str) -> None:
        if seen is not None:
            seen.append(value)
        if value.startswith("bad"):
            raise ValueError(f"cannot use {value}")

    fs.repeated("upstream", "repeatable", on_upstream)
    return fs


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-service", "web"],
        ["-service=web"],
        ["--service", "web"],
        ["--service=web"],
    ],
)
def test_string_flag_accepts_separate_and_equals_forms_with_one_or_two_dashes(
    args: list[str],
) -> None:
    assert make_flags().parse(args) == ({"service": "web"}, [])


def test_equals_form_splits_at_the_first_equals_sign() -> None:
    values, _ = make_flags().parse(["-service=a=b"])
    assert values == {"service": "a=b"}


def test_equals_form_with_nothing_after_it_sets_an_empty_value() -> None:
    assert make_flags().parse(["-service="]) == ({"service": ""}, [])


def test_separate_value_is_taken_even_when_it_looks_like_a_flag() -> None:
    # Go takes the next argument as the value, whatever it looks like.
    assert make_flags().parse(["-service", "-listen"]) == ({"service": "-listen"}, [])


def test_unset_flags_are_absent_from_the_values() -> None:
    assert make_flags().parse([]) == ({}, [])


def test_a_repeated_string_flag_keeps_the_last_value() -> None:
    values, _ = make_flags().parse(["-service", "a", "-service", "b"])
    assert values == {"service": "b"}


# -- bool flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-register"], True),
        (["--register"], True),
        (["-register=true"], True),
        (["-register=T"], True),
        (["-register=1"], True),
        (["-register=false"], False),
        (["-register=F"], False),
        (["-register=0"], False),
        (["--register=False"], False),
    ],
)
def test_bool_flag_is_true_alone_or_takes_a_value_after_equals(
    args: list[str], expected: bool
) -> None:
    values, rest = make_flags().parse(args)
    assert values == {"register": expected}
    assert rest == []


def test_bool_flag_does_not_consume_the_next_argument() -> None:
    # `-register false` is `-register` followed by the non-flag `false`.
    assert make_flags().parse(["-register", "false"]) == ({"register": True}, ["false"])


@pytest.mark.parametrize("value", ["yes", "no", "", "on", "2", "tRUE"])
def test_bool_flag_with_an_invalid_value_has_gos_message(value: str) -> None:
    with pytest.raises(FlagError) as info:
        make_flags().parse([f"-register={value}"])
    assert str(info.value) == f'invalid boolean value "{value}" for -register: parse error'


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "flag provided but not defined: -x"),
        (["--x"], "flag provided but not defined: -x"),
        (["-x=1"], "flag provided but not defined: -x"),
        (["-service", "web", "-servic", "db"], "flag provided but not defined: -servic"),
        (["-service"], "flag needs an argument: -service"),
        (["--listen"], "flag needs an argument: -listen"),
        (["-register", "-upstream"], "flag needs an argument: -upstream"),
        (["---x"], "bad flag syntax: ---x"),
        (["-=x"], "bad flag syntax: -=x"),
        (["--=x"], "bad flag syntax: --=x"),
    ],
)
def test_malformed_command_lines_fail_with_gos_messages(args: list[str], message: str) -> None:
    with pytest.raises(FlagError) as info:
        make_flags().parse(args)
    assert str(info.value) == message


def test_flag_error_is_a_value_error() -> None:
    assert issubclass(FlagError, ValueError)


def test_flags_are_not_abbreviated() -> None:
    # argparse would accept a unique prefix; Go's flag package does not.
    with pytest.raises(FlagError, match=r"^flag provided but not defined: -serv$"):
        make_flags().parse(["-serv", "web"])


# -- where parsing stops ------------------------------------------------------------------


def test_parsing_stops_at_the_first_non_flag_argument() -> None:
    values, rest = make_flags().parse(["-service", "web", "extra", "-listen", "x"])
    assert values == {"service": "web"}
    assert rest == ["extra", "-listen", "x"]


def test_double_dash_ends_the_flags_and_is_consumed() -> None:
    values, rest = make_flags().parse(["-service", "web", "--", "-listen", "x"])
    assert values == {"service": "web"}
    assert rest == ["-listen", "x"]


def test_only_the_first_double_dash_is_consumed() -> None:
    assert make_flags().parse(["--", "--"]) == ({}, ["--"])


def test_a_lone_dash_is_a_non_flag_argument() -> None:
    assert make_flags().parse(["-", "-service", "web"]) == ({}, ["-", "-service", "web"])


def test_an_empty_argument_is_a_non_flag_argument() -> None:
    assert make_flags().parse(["", "-service", "web"]) == ({}, ["", "-service", "web"])


def test_an_undefined_flag_after_a_non_flag_is_not_an_error() -> None:
    assert make_flags().parse(["extra", "-nope"]) == ({}, ["extra", "-nope"])


# -- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["-h"], ["-help"], ["--help"], ["--h"], ["-help=1"], ["-service", "web", "-h"]],
)
def test_help_flags_raise_help_requested(args: list[str]) -> None:
    with pytest.raises(HelpRequested):
        make_flags().parse(args)


def test_help_after_a_non_flag_is_a_plain_argument() -> None:
    assert make_flags().parse(["extra", "-help"]) == ({}, ["extra", "-help"])


def test_help_as_the_value_of_a_flag_is_a_value() -> None:
    assert make_flags().parse(["-service", "-help"]) == ({"service": "-help"}, [])


def test_a_flag_named_help_is_parsed_as_a_flag() -> None:
    fs = FlagSet()
    fs.boolean("help", False, "defined on purpose")
    assert fs.parse(["-help"]) == ({"help": True}, [])


# -- repeated flags -----------------------------------------------------------------------


def test_repeated_flag_calls_on_value_for_each_occurrence_in_order() -> None:
    seen: list[str] = []
    values, rest = make_flags(seen).parse(
        ["-upstream", "db:8181", "-upstream=cache:9191", "--upstream", "db:8282"]
    )
    assert seen == ["db:8181", "cache:9191", "db:8282"]
    assert values == {"upstream": "db:8282"}
    assert rest == []


def test_value_error_from_on_value_becomes_gos_invalid_value_message() -> None:
    seen: list[str] = []
    with pytest.raises(FlagError) as info:
        make_flags(seen).parse(["-upstream", "ok", "-upstream", "bad1", "-upstream", "never"])
    assert str(info.value) == 'invalid value "bad1" for flag -upstream: cannot use bad1'
    assert seen == ["ok", "bad1"]  # parsing stops at the first error


def test_repeated_flag_needs_an_argument_like_any_string_flag() -> None:
    with pytest.raises(FlagError, match=r"^flag needs an argument: -upstream$"):
        make_flags().parse(["-upstream"])


def test_invalid_value_message_quotes_the_value_like_go_percent_q() -> None:
    with pytest.raises(FlagError) as info:
        make_flags().parse(["-upstream", 'bad"x'])
    assert str(info.value) == 'invalid value "bad\\"x" for flag -upstream: cannot use bad"x'


# -- parse_bool ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_accepts_gos_true_spellings(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_accepts_gos_false_spellings(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize(
    "text", ["", "yes", "no", "on", "off", "tRuE", "fAlSe", " true", "true ", "2", "-1", "y"]
)
def test_parse_bool_rejects_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"^parse error$"):
        parse_bool(text)


# -- usage --------------------------------------------------------------------------------


def test_usage_lists_flags_sorted_with_value_placeholder_except_bools() -> None:
    lines = make_flags().usage().splitlines()
    heads = [line for line in lines if line.startswith("  -")]
    assert heads == [
        "  -listen=<value>",
        "  -register",
        "  -service=<value>",
        "  -upstream=<value>",
    ]
    assert "\t" not in make_flags().usage()
