"""`rlk2 --help` and every subcommand's help render (help strings are %-formatted by argparse)."""

import pytest

from rlk2.cli import COMMANDS, main


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_renders_and_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rlk2" in out and "%%" not in out
