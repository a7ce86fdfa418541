"""The `instseg` command line as a user meets it: help for everything, no internal words."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from instseg_trainer.cli import build_parser, main
from instseg_trainer.models import complexity


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_a_summary_and_a_description() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {action.dest: action.help for action in sub._choices_actions}
    for name, subparser in _subcommands(parser).items():
        assert summaries.get(name), f"`instseg -h` lists {name} without a summary"
        assert subparser.description, f"`instseg {name} -h` has no description"


def test_every_flag_and_argument_has_a_help_line() -> None:
    parser = build_parser()
    for name, subparser in {"": parser, **_subcommands(parser)}.items():
        for action in subparser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"instseg {name} {flag}"


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for the FLOP count (minutes on a CPU); the table's text is under test."""
    figures = {"gflops": 1.0, "parameters": 2e6, "size_mb": 3.0}
    monkeypatch.setattr(complexity, "measure_complexity", lambda template: figures)


@pytest.mark.parametrize("flags", [[], ["--no-measure"]], ids=["measured", "no-measure"])
def test_templates_speak_of_otxs_published_figures(measured, capsys, flags) -> None:
    assert main(["templates", *flags]) == 0
    out = capsys.readouterr().out
    assert "seed" not in out.lower()
    header = out.splitlines()[0]
    assert "GFLOPs (OTX)" in header and "Size MB (OTX)" in header
    assert "MaskRCNN-ResNet50" in out and "(533.8)" in out
    if not flags:
        assert "In brackets: the figures OTX publishes" in out


def test_roots_flags_take_several_roots_comma_separated_or_repeated() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            "MaskRCNN-ResNet50",
            "--train-data-roots",
            "/d/a,/d/b",
            "--train-data-roots",
            "/d/c",
            "--val-data-roots",
            "/d/v",
        ]  # fmt: skip
    )
    assert args.train_data_roots == [Path("/d/a"), Path("/d/b"), Path("/d/c")]
    assert args.val_data_roots == [Path("/d/v")]
    args = parser.parse_args(["eval", "--weights", "best.pt", "--data-roots", "/d/a, /d/b"])
    assert args.data_roots == [Path("/d/a"), Path("/d/b")]


def test_a_roots_flag_without_a_path_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--weights", "best.pt", "--data-roots", ","])
    assert exited.value.code == 2
    assert "--data-roots: expected comma-separated paths" in capsys.readouterr().err
