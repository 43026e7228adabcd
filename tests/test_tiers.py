"""The test tiers (tests/tiers.py): what puts a test in the slow tier, and the guard that fails a test of the
fast tier doing a slow thing, so that `make check` stays fast as tests are added and changed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tiers import FEW_STEPS, SLOW_FIXTURES, slow_reason

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
PY = sys.executable


@pytest.mark.parametrize("argv, why", [
    (["/usr/sbin/sshd", "-D", "-e", "-f", "/tmp/x/sshd_config"], "starts sshd"),
    (["/usr/lib/chromium/chromium", "--headless=new"], "starts a browser"),
    ([".venv/lib/python3.11/site-packages/playwright/driver/node", "cli.js", "run-driver"], "starts a browser"),
    ([PY, "-m", "ipykernel_launcher", "-f", "/tmp/kernel.json"], "starts a Jupyter kernel or server"),
    ([PY, "-m", "jupyterlab", "--no-browser"], "starts a Jupyter kernel or server"),
    ([PY, "-m", "papermill", "in.ipynb", "out.ipynb"], "starts a Jupyter kernel or server"),
    ([PY, "-m", "nanorepro", "run-notebooks", "-p", "char_max_iters", "4"], "runs the notebooks (papermill)"),
    ([".venv/bin/nanorepro", "run-notebooks"], "runs the notebooks (papermill)"),
    ([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanorepro", "train"],
     "starts torchrun"),
    (["/usr/bin/torchrun", "--nproc_per_node=2", "train.py"], "starts torchrun"),
    ([PY, "train.py", f"--max_iters={FEW_STEPS + 1}"], f"trains {FEW_STEPS + 1} steps in a subprocess"),
    ([PY, "train.py", "--max_iters", "300"], "trains 300 steps in a subprocess"),
    ([PY, "-m", "nanorepro", "train", "--max_iters=2"], None),
    ([PY, "train.py", f"--max_iters={FEW_STEPS}"], None),
    ([PY, "-c", "import sshd; print('torchrun papermill chromium')"], None),
    (["git", "init", "-q"], None),
    (["ssh-keygen", "-q", "-t", "ed25519"], None),
])
def test_what_a_started_process_says_about_the_tier(argv, why):
    reason = slow_reason(argv)
    assert (reason is None) if why is None else (reason or "").startswith(why), reason


CONFTEST = """
import pytest
from tiers import (pytest_collection_modifyitems, pytest_configure, pytest_fixture_setup,  # noqa: F401
                   pytest_runtest_protocol, pytest_runtest_teardown)


@pytest.fixture(scope="session")
def loopback_node():  # its name in tiers.SLOW_FIXTURES: its tests are marked slow when collected
    return "the node"


@pytest.fixture(autouse=True)
def _every_test(request):  # as conftest.py's _reset_loopback_node: asks for a slow fixture only for its users
    return request.getfixturevalue("server") if "server" in request.fixturenames else None
"""

TESTS_OF_BOTH_TIERS = """
import os
import subprocess

import pytest

SSHD = os.environ["FAKE_SSHD"]  # a program named sshd that does nothing


@pytest.fixture(scope="module")
def server():
    subprocess.run([SSHD], check=True)
    return "up"


@pytest.fixture(scope="module")
def another_server():
    subprocess.run([SSHD], check=True)
    return "up"


@pytest.fixture(scope="module")
def asks_while_set_up(request):
    return request.getfixturevalue("another_server")


def steps(n):
    import torch  # first imported here, after the guard was installed

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    for _ in range(n):
        p.grad = torch.ones(1)
        opt.step()


def test_fast():
    assert 1 + 1 == 2


def test_unmarked_starts_sshd():
    subprocess.run([SSHD], check=True)


@pytest.mark.slow
def test_marked_starts_sshd():
    subprocess.run([SSHD], check=True)


@pytest.mark.slow
def test_marked_sets_the_server_up(server):
    assert server == "up"


def test_unmarked_uses_the_server_set_up_before(server):
    assert server == "up"


@pytest.mark.slow
def test_marked_sets_up_what_asks_for_another_server(asks_while_set_up):
    assert asks_while_set_up == "up"


def test_unmarked_uses_what_asked_for_another_server(asks_while_set_up):
    assert asks_while_set_up == "up"


def test_unmarked_uses_the_loopback_node(loopback_node):
    assert loopback_node == "the node"


def test_unmarked_trains_a_few_steps():
    steps(FEW)


def test_unmarked_trains_past_a_few_steps():
    steps(FEW + 1)


def test_fast_after_all_that():
    assert 2 + 2 == 4
"""


@pytest.fixture
def suite(pytester, tmp_path, monkeypatch):
    """A small suite of both tiers with the guard's hooks in its conftest.py; a fake sshd on its PATH."""
    fake = tmp_path / "bin" / "sshd"
    fake.parent.mkdir()
    fake.symlink_to("/bin/true")
    monkeypatch.setenv("FAKE_SSHD", str(fake))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    pytester.makeini("[pytest]\nmarkers =\n    slow: the slow tier\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_both=TESTS_OF_BOTH_TIERS.replace("FEW", str(FEW_STEPS)))
    return pytester


@pytest.mark.slow  # by measurement: an inner pytest session: ~9 s
def test_a_test_of_the_fast_tier_that_does_a_slow_thing_fails_naming_it(suite):
    assert "conftest.loopback_node" in SLOW_FIXTURES
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-rE")
    result.assert_outcomes(passed=11, errors=4)
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert [e.split()[1] for e in errors] == [f"test_both.py::{name}" for name in (
        "test_unmarked_starts_sshd", "test_unmarked_uses_the_server_set_up_before",
        "test_unmarked_uses_what_asked_for_another_server", "test_unmarked_trains_past_a_few_steps")]
    text = "\n".join(result.outlines)
    assert "test_unmarked_starts_sshd is in the fast tier, but starts sshd: mark it @pytest.mark.slow" in text
    assert ("test_unmarked_uses_the_server_set_up_before is in the fast tier, but uses fixture "
            "'test_both.server', which starts sshd") in text
    assert ("test_unmarked_uses_what_asked_for_another_server is in the fast tier, but uses fixture "
            "'test_both.asks_while_set_up', which starts sshd") in text
    assert f"test_unmarked_trains_past_a_few_steps is in the fast tier, but trains more than {FEW_STEPS} steps" in text


def test_a_test_using_a_slow_fixture_is_in_the_slow_tier(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not slow", "--collect-only", "-q")
    collected = [line.split("::")[1] for line in result.outlines if line.startswith("test_both.py::")]
    assert collected == ["test_fast", "test_unmarked_starts_sshd", "test_unmarked_uses_the_server_set_up_before",
                         "test_unmarked_uses_what_asked_for_another_server", "test_unmarked_trains_a_few_steps", "test_unmarked_trains_past_a_few_steps",
                         "test_fast_after_all_that"]
