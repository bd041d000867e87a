"""The README's notebook example runs as written, and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def notebook_block() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def test_readme_notebook_example_runs_and_edits_visibly():
    torch.set_num_threads(1)
    code = notebook_block()
    # Run it up to the undo, check the edit is visible, then run the undo and check the model is back.
    head, undo = code.split("journal.undo(model)")
    env: dict = {}
    exec(compile(head, "README.md", "exec"), env)
    model, prompt = env["model"], "Zashand Shaivsosk is a citizen of"
    target = env["journal"].entries[-1].requests[0]["target"]
    edited = model.decode([int(model.next_token_logits(prompt)[0].argmax())])
    assert edited == target, (edited, target)  # the example edits to an object the model did not answer
    exec(compile("journal.undo(model)" + undo, "README.md", "exec"), env)
    assert model.decode([int(model.next_token_logits(prompt)[0].argmax())]) != target
    trace = env["trace"]
    assert trace.scores.std() > 0.01  # an informative trace: not a flat grid
    assert len(repr(trace)) < 400  # the repr states the result, not the grid
