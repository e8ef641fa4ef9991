"""Shared fixtures: small real checkpoints of every adapted architecture.

``checkpoint(name)`` saves a randomly initialised zoo-config model (a real transformers
class at toy size, fewer layers) with the zoo tokenizer into a temp folder: fast, so the
adapter and runner tests cover every architecture. ``trained_zoo`` builds (or reuses
from the cache) the trained default zoo model, for tests about compression quality.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import moebench  # noqa: F401  (first: sets the OpenMP defaults before torch loads libgomp)
import torch  # noqa: E402

ARCHS = ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def suite_file(folder: Path, source, methods: str, name: str = "t", max_samples: int = 6) -> str:
    """Write a small suite on ``source`` (4 x 32 calibration tokens, perplexity on ``max_samples``
    windows of 32) with the given ``[[methods]]`` TOML; returns its path."""
    path = Path(folder) / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        [suite]
        name = "{name}"
        [model]
        source = "{source}"
        [calibration]
        samples = 4
        seqlen = 32
        [eval.perplexity]
        seqlen = 32
        max_samples = {max_samples}
    """) + textwrap.dedent(methods))
    return str(path)


def kl_from(base: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean per-token KL(base || model) of next-token predictions: how far compression moved the model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(8):
            ref = base(input_ids=batch).logits.float().log_softmax(-1)
            new = model(input_ids=batch).logits.float().log_softmax(-1)
            total += (ref.exp() * (ref - new)).sum().item()
            count += batch.numel()
    return total / count


def make_checkpoint(folder: Path, name: str, seed: int = 0, **overrides) -> Path:
    """Save a random zoo-config model of architecture ``name`` (5 layers) with the zoo tokenizer."""
    import transformers

    from moebench import zoo

    config = zoo.config(name, **{"num_hidden_layers": 5, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init's so routing and edits change outputs visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): tiny models on the shared 2-core test machine run
    several times faster on one thread. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def trained_zoo():
    """The trained default zoo model's folder (built on first use, then cached)."""
    from moebench import zoo

    return zoo.path(zoo.DEFAULT, progress=False)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh MOEBENCH_HOME for tests that count calibration passes (the zoo stays shared)."""
    from moebench import paths

    zoo_dir = paths.cache_dir("zoo")
    tok_dir = paths.cache_dir("tokenizers")
    monkeypatch.setenv("MOEBENCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    os.symlink(zoo_dir, tmp_path / "home" / "zoo")
    os.symlink(tok_dir, tmp_path / "home" / "tokenizers")
    return tmp_path / "home"
