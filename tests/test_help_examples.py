"""Every example command line in a ``--help`` text runs as written.

``metaopt --help`` lists examples that build ``runs/lrs``; every ``examples:`` block of
the sub-commands' help (eval, export, each recipe, each recipe command) is then run
from the same directory."""

import contextlib
import io
import re

import pytest

from metaopt import cli, recipes


def _help(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"] if argv else ["--help"])
    return buf.getvalue()


def _examples(text: str, header: str = "examples:") -> list[str]:
    """The command lines of a help text's examples block."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().lower().startswith(header)]
    out = []
    for i in starts:
        for line in lines[i + 1 :]:
            if not line.startswith("  ") or not line.strip():
                break
            out.append(line.strip())
    return out


def _helps() -> dict[str, str]:
    texts = {"eval": _help(["eval"]), "export": _help(["export"])}
    for name, r in recipes.all_recipes().items():
        texts[name] = _help([name])
        for command in r.commands:
            texts[f"{name} {command}"] = _help([name, command])
    return texts


def test_every_help_text_has_examples_and_no_unchecked_fragments():
    top = _examples(_help([]), "examples (")
    assert top[0].startswith("metaopt lr-schedule") and len(top) >= 4
    for where, text in _helps().items():
        if where in ("eval", "export") or where in recipes.all_recipes():
            assert _examples(text), f"`metaopt {where} --help` lists no examples"
        # an "e.g." inside an option's help would be an example no test runs
        assert not re.search(r"e\.g\. (--|\w+=)", text), where


@pytest.mark.slow
def test_every_help_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = _examples(_help([]), "examples (")
    for text in _helps().values():
        commands += [c for c in _examples(text) if c not in commands]
    for command in commands:
        argv = command.split()
        assert argv[0] == "metaopt", command
        code = cli.main(argv[1:])
        assert code == 0, f"{command}: {capsys.readouterr().err}"


def test_help_groups_the_core_keys_the_same_way_in_every_recipe():
    for name, r in recipes.all_recipes().items():
        text = _help([name])
        fields = {f for f in r.config_cls.__dataclass_fields__}
        if "steps_per_call" in fields:
            after = text.split("meta-training (the core's keys")[1]
            block = re.split(r"\n  \S", after)[0]
            assert "steps_per_call" in block and "seed " in block, name
        if "population" in fields:
            assert "outer loop (metaopt.outer.CONFIG_FIELDS):" in text, name
