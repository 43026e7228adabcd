"""The one error type users see: a problem and the fix, printed as one line by the CLI and by notebooks."""

import os
import sys


class UserError(Exception):
    """Bad input or an unmet requirement. The CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)


class ModelUnavailable(UserError):
    """Pretrained weights not to be had here (no network, not cached): exit 3, a pipeline's stage "not run"."""

    exit_code = 3


class WontFit(UserError):
    """A run whose estimated memory exceeds the device's: exit 4, a pipeline's stage "not run"."""

    exit_code = 4


class Interrupted(UserError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; exits with 128 + the signal."""

    def __init__(self, problem: str, fix: str, signum: int):
        super().__init__(problem, fix)
        self.exit_code = 128 + signum


def one_line_in_notebooks() -> None:
    """In a Jupyter (IPython) kernel, show a UserError as its one line, as the CLI does, not a traceback through
    the package; NANOREPRO_DEBUG=1 keeps tracebacks. Does nothing outside IPython (and never imports it)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython and hasattr(ipython, "get_ipython") else None
    if shell is None or os.environ.get("NANOREPRO_DEBUG"):
        return

    def show(shell, etype, value, tb, tb_offset=None):  # noqa: ANN001 (IPython's handler signature)
        lines = [f"{etype.__name__}: {value}"]
        shell._showtraceback(etype, value, lines)  # the kernel sends it as the cell's error output
        return lines

    shell.set_custom_exc((UserError,), show)
