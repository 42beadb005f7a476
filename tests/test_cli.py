"""Every script's command line: --help lists each option with its docstring (the README promises one per option),
and the option forms that the README and the docstrings write parse to what they say."""

import ast
import contextlib
import inspect
import io
import re
from dataclasses import fields

import pytest
import tyro

import flow_grpo
import flow_noise_ppo
import flow_sde_ppo
import sft_baseline

SCRIPTS = [sft_baseline, flow_sde_ppo, flow_noise_ppo, flow_grpo]


def field_docstrings(cls) -> dict[str, str | None]:
    """name -> the field's help as tyro reads it: the string literal right after the field, else its inline comment,
    else the comment lines right above it (None where there is none)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            after = body[i + 1] if i + 1 < len(body) else None
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = after.value.value
                continue
            line = lines[node.lineno - 1]
            inline = line.split("  # ", 1)[1] if "  # " in line else None
            above, j = [], node.lineno - 2
            while j >= 0 and lines[j].strip().startswith("#"):
                above.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            docs[node.target.id] = inline or (" ".join(above) if above else None)
    return docs


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_lists_every_option_with_its_docstring(script, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside the words we look for
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        tyro.cli(script.Args, args=["--help"])
    assert stop.value.code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out.getvalue()).split())
    docs = field_docstrings(script.Args)
    assert set(docs) == {f.name for f in fields(script.Args)}
    for name, doc in docs.items():
        assert doc, f"{script.__name__}.Args.{name} has no docstring"
        assert f"--{name.replace('_', '-')}" in text
        first_words = " ".join(doc.split()[:4])
        assert first_words in text, f"--help lacks the docstring of {name}: {first_words!r}"


@pytest.mark.parametrize("script", [flow_sde_ppo, flow_noise_ppo, flow_grpo], ids=lambda m: m.__name__)
def test_rl_option_forms_parse(script):
    # the README's GPU command, and the forms the README's tables and the docstrings write
    args = tyro.cli(script.Args, args=["--env-id", "PickCube", "--num-envs", "320", "--task-ids", "0", "2",
                                       "--time-budget-min", "30", "--no-anneal-lr", "--lr", "1e-5"])
    assert (args.env_id, args.num_envs, args.task_ids, args.time_budget_min) == ("PickCube", 320, (0, 2), 30.0)
    assert (args.anneal_lr, args.lr) == (False, 1e-5)
    default = script.Args()
    assert args.seed == default.seed and args.denoise_steps == default.denoise_steps
    assert tyro.cli(script.Args, args=["--target-kl", "0.1"]).target_kl == 0.1
    assert tyro.cli(script.Args, args=["--target-kl", "None"]).target_kl is None
