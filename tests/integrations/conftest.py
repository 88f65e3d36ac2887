"""Fixtures for the multi-process tests: the tiny Llama folder, a small LLM-Adapters data file, launch helpers."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from ..recipes.conftest import save_tiny_model, tiny_model_dir  # noqa: F401 - shared session fixture

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "accelerate"


@pytest.fixture(scope="session")
def sft_data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short true/false rows of different lengths (so every rank's batches hold different token counts)."""
    rng = random.Random(0)
    words = ["true", "false", "answer1", "option2", "solution1", "ending3"]
    rows = []
    for _ in range(40):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        answer = rng.choice(["true", "false"])
        rows.append(
            {
                "instruction": f"Please answer the following question with true or false, question: {question}",
                "input": "",
                "output": f"the correct answer is {answer}",
                "answer": answer,
            }
        )
    path = tmp_path_factory.mktemp("sft-data") / "truefalse.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def free_port() -> int:
    """A free TCP port for the rendezvous (other test sessions may run on the same machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_env() -> dict[str, str]:
    """The environment of a launched run: CPU only (comparable everywhere), one thread per process, offline."""
    env = dict(os.environ)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONFAULTHANDLER": "1",
        }
    )
    return env


def start(command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` in the repository root with stdout+stderr going to ``log``."""
    handle = log.open("w", encoding="utf-8")
    return subprocess.Popen(
        list(command), cwd=REPO_ROOT, env=env or cpu_env(), stdout=handle, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait for ``process``; on failure, fail the test with the end of its log."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-6000:]
        pytest.fail(f"{' '.join(map(str, process.args))} exited with {process.returncode}:\n{tail}")


PYTHON = sys.executable
