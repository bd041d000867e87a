"""A prompt the model cannot take is refused in one line, exit 2, before any work, by every command.

The rule lives on the model (``MemoryModel.encode`` / ``check_length``, and the edit batch): empty prompts, and
prompts longer than the model's context (128 tokens on the default testbed), never reach the network.
"""

from __future__ import annotations

import pytest

from ffkv.cli import main

LONG = " ".join(["It is known that Zashand Shaivsosk is a citizen of"] * 30)  # ~300 tokens > 128


def _commands(model, subject, out):
    return {
        "trace": ["trace", model, "--subject", subject, "--samples", "2", "--out", str(out / "t")],
        "neurons": ["neurons", model, "--answer", "Peru", "--out", str(out / "n")],
        "recall": ["recall", model, "--subject", subject],
        "subupdates": ["atlas", "subupdates", model],
        "edit": ["edit", "apply", model, "--subject", subject, "--target", "Kenya", "--out", str(out / "e")],
    }


@pytest.mark.parametrize("command", ["trace", "neurons", "recall", "subupdates", "edit"])
@pytest.mark.parametrize("kind", ["long", "empty"])
def test_prompt_refused_in_one_line(command, kind, default_testbed, tmp_path, capsys):
    model = str(default_testbed / "model")
    subject = "Zashand Shaivsosk"
    args = _commands(model, subject, tmp_path)[command]
    if kind == "long":
        prompt = LONG if command != "edit" else LONG.replace(subject, "{}", 1)
    else:
        prompt = "" if command not in ("trace", "recall", "edit") else " "
        if command in ("trace", "recall", "edit"):
            args = [a for a in args if a not in ("--subject", subject)]  # no subject fits an empty prompt
    with pytest.raises(SystemExit) as e:
        main([*args, "--prompt", prompt])
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("Loading")]
    assert len(err) == 1 and err[0].startswith("ffkv: error: "), err
    if kind == "long":
        assert "longer than the model's context (128 tokens)" in err[0], err
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing half-written
