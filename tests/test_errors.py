"""Tests for pipeline/errors.py, the one line an exception gives a one-line error, and for click's usage errors
in cli.py, one line too."""

import pytest
from click.testing import CliRunner

import cli
from pipeline.errors import first_line


def test_first_line_is_the_messages_first_line_or_the_type():
    assert first_line(ValueError("bad chunk\nTraceback detail")) == "bad chunk"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("  \n")) == "ValueError"


def test_a_long_line_is_cut_visibly():
    message = "chunk 3 of patch_tokens: " + "x" * 100 + " 9 compressed / 7 raw, expected 196608 raw"
    line = first_line(ValueError(message))  # was cut to "... expected 196"
    assert len(line) == 160 and line.endswith("...") and message.startswith(line[:-3])
    assert first_line(ValueError(message[:160])) == message[:160]  # 160 characters: whole
    assert first_line(ValueError(message), 120) == message[:117] + "..."  # a caller's shorter bound, cut alike


def test_terminal_codes_are_dropped():
    # torch's refusal of an unsafe checkpoint says "\x1b[1mWeights only load failed\x1b[0m"; cut at 120, the reset
    # was lost and the terminal stayed bold after the warning
    message = "\x1b[1mWeights only load failed.\x1b[0m " + "y" * 200
    line = first_line(ValueError(message), 120)
    assert "\x1b" not in line and line == ("Weights only load failed. " + "y" * 200)[:117] + "..."


@pytest.mark.parametrize("args, says, command", [
    (["train-reranker", "--spatial", "foo"], "Invalid value for '--spatial': 'foo' is not one of", "train-reranker"),
    (["extract", "--frames", "0"], "Invalid value for '--frames': 0 is not in the range", "extract"),
    (["info", "--cache"], "Option '--cache' requires an argument", "info"),
    (["search"], "Missing argument 'QUERY'", "search"),
    (["train-reranker", "--sptial", "flat"], "No such option '--sptial'. (Did you mean one of:", "train-reranker"),
    (["evaluat"], "No such command 'evaluat'. Did you mean 'evaluate'?", ""),  # click's hint, on its line before
    (["--bogus"], "No such option '--bogus'", ""),
])
def test_usage_errors_are_one_line_naming_the_commands_help(args, says, command):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {says}") and result.stderr.count("\n") == 1
    assert result.stderr.endswith(f" See `{' '.join(['main', command]).strip()} --help`.\n")  # CliRunner's name


def test_no_command_still_shows_the_help():
    result = CliRunner().invoke(cli.main, [])
    assert result.exit_code == 2 and result.output.startswith("Usage: ") and "train-reranker" in result.output
