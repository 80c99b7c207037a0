"""Quiet by default (deltamoe/common/quiet.py): megatron-core's, torch's and transformers' known, harmless warnings are
filtered; DELTAMOE_VERBOSE=1 / `deltamoe --verbose` shows them again. Checked on real imports in fresh processes."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from deltamoe.common import quiet
from tests.megatron_helpers import REPO

WARNING_LINE = re.compile(r"[Ww]arning|WARNING|W[0-9]{4} ")
# What the trainer's imports and a model build raise on a CPU machine without Transformer Engine and apex.
IMPORTS = ("import deltamoe, torch, torch.utils.cpp_extension; import megatron.training; "
           "from megatron.core.models.gpt import gpt_layer_specs; "
           "from megatron.core.transformer.transformer_config import TransformerConfig; "
           "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)")


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    clean.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def imports_quiet_and_verbose():
    return _run(["-c", IMPORTS]), _run(["-c", IMPORTS], DELTAMOE_VERBOSE="1")


def test_megatron_and_torch_imports_are_quiet_by_default(imports_quiet_and_verbose):
    quiet_run, verbose_run = imports_quiet_and_verbose
    assert quiet_run.returncode == 0 and verbose_run.returncode == 0, quiet_run.stderr[-3000:] + verbose_run.stderr[-3000:]
    noisy = [line for line in quiet_run.stderr.splitlines() if WARNING_LINE.search(line)]
    assert noisy == [], noisy
    # The same process with DELTAMOE_VERBOSE=1 shows what the filters hid: they, not luck, made it quiet.
    shown = verbose_run.stderr
    assert "full scope is deprecated" in shown  # megatron-core's own default raises it everywhere
    if not _have_te():
        assert "Transformer Engine and Apex are not installed" in shown


def _have_te() -> bool:
    from deltamoe.megatron_ext.runtime.specs import HAVE_TE

    return HAVE_TE


def test_every_filter_names_one_message_and_a_reason():
    for w in quiet.WARNINGS:
        assert w.message and w.module and w.why and not w.message.startswith(".*"), w
        re.compile(w.message), re.compile(w.module)
    for r in quiet.LOG_RECORDS:
        assert r.logger and r.message and r.why, r


def test_install_and_set_verbose_in_process(monkeypatch):
    monkeypatch.setenv(quiet.VERBOSE_ENV, "")
    quiet.set_verbose()  # undo what importing deltamoe installed, then start from nothing
    monkeypatch.delenv(quiet.VERBOSE_ENV)
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet.install()
            warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning, "x.py", 1,
                                   module="megatron.core.models.backends")
            warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning, "x.py", 2,
                                   module="somebody.else")  # another module's message is not ours to hide
            logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
            logger.warning("something else")
            assert [w.lineno for w in seen] == [2] and [r.getMessage() for r in records] == ["something else"]
            assert logging.getLogger("megatron.core.distributed.param_and_grad_buffer").level == logging.WARNING

            quiet.set_verbose()
            assert os.environ[quiet.VERBOSE_ENV] == "1"
            warnings.warn_explicit("Apex is not installed. Falling back to Torch Norm", UserWarning, "x.py", 3,
                                   module="megatron.core.models.backends")
            logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
            assert [w.lineno for w in seen] == [2, 3] and len(records) == 2
            assert logging.getLogger("megatron.core.distributed.param_and_grad_buffer").level == logging.NOTSET
    finally:
        logger.removeHandler(handler)
        os.environ.pop(quiet.VERBOSE_ENV, None)
        quiet.install()  # as importing deltamoe left it


def test_train_help_shows_both_flag_sets_without_warnings():
    result = _run(["-m", "deltamoe", "train", "--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("usage: deltamoe train")
    for flag in ("--deltamoe-stage", "--lpr-loss-coeff", "--verbose", "--tensor-model-parallel-size",
                 "--expert-model-parallel-size", "--train-iters", "--save"):
        assert flag in out, flag
    assert out.index("DeltaMoE:") < out.index("--tensor-model-parallel-size")  # our group first
    assert "torchrun --nproc-per-node 8 -m deltamoe train" in out
    assert [line for line in result.stderr.splitlines() if WARNING_LINE.search(line)] == []
    verbose = _run(["-m", "deltamoe", "--verbose", "train", "--help"])
    assert verbose.returncode == 0 and verbose.stdout == out
    if not _have_te():
        assert "Transformer Engine and Apex are not installed" in verbose.stderr, "--verbose shows what is hidden"
