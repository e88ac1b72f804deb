"""The README's code runs as written (the quickstart prints the optimized prompt)."""

import re
from pathlib import Path

import afnio

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    previous = afnio.get_backward_model_client()
    previous_args = afnio.get_backward_model_completion_args()
    try:
        for index, block in enumerate(blocks):
            exec(compile(block, f"README block {index}", "exec"), {})
    finally:
        afnio.set_backward_model_client(previous, completion_args=previous_args)
    assert "Answer positive, neutral or negative." in capsys.readouterr().out


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert 'pip install -e ".[local]" && python examples/facility_support.py' in text
    assert 'pip install -e ".[dev,local]" && python -m pytest tests' in text
