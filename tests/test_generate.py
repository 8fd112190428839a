"""`tokencomp generate` on a tiny random LLaVA saved with save_pretrained (the real loading path, offline)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tiny_models import save_tiny_llava_checkpoint
from tokencomp.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    save_tiny_llava_checkpoint(folder)
    picture = folder / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype("uint8")).save(picture)
    return folder


def test_generate_prints_both_answers_and_token_counts(checkpoint):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(checkpoint),
            "--image",
            str(checkpoint / "picture.png"),
            "--prompt",
            "w5 w6 w7",
            "--strategy",
            "apet",
            "--budget",
            "12",
            "--param",
            "num_basis=4",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "uncompressed" in result.output and "apet budget=12 num_basis=4" in result.output
    assert "36 -> 36" in result.output and "36 -> 12" in result.output
    answers = re.findall(r"((?:w\d+ ?){4})", result.output)
    assert len(answers) >= 2  # two four-word answers from the word-level vocabulary


def test_generate_with_a_bundled_image_and_an_in_llm_strategy(checkpoint):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(checkpoint),
            "--image",
            "astronaut",
            "--prompt",
            "w9",
            "--strategy",
            "fastv",
            "--budget",
            "10",
            "--eager-fallback",
            "--max-new-tokens",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "36 -> 10" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "no-such-image"], "neither a file nor a bundled image"),
        (["--model", "no-such-folder"], "neither a local folder nor a hub id"),
        (["--strategy", "apett"], "Did you mean"),
        (["--param", "basis=nope"], "basis"),
        (["--budget", "many"], "not a number"),
    ],
)
def test_generate_errors(checkpoint, args, message):
    base = {"--model": str(checkpoint), "--image": str(checkpoint / "picture.png"), "--prompt": "w5"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = runner.invoke(app, ["generate", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2
    assert message in result.output
