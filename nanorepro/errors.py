"""The one error type users see: a problem and the fix, printed as one line by the CLI."""


class UserError(Exception):
    """Bad input or an unmet requirement. The CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)


class ModelUnavailable(UserError):
    """Pretrained weights that cannot be had here (no network, not cached). The CLI exits with 3 so
    a pipeline can record the stage as not run and go on."""

    exit_code = 3


class WontFit(UserError):
    """A run whose estimated memory exceeds the device's; exits with 4 so a pipeline can record it
    as not run and go on to the next model."""

    exit_code = 4


class Interrupted(UserError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; exits with 128 + the signal."""

    def __init__(self, problem: str, fix: str, signum: int):
        super().__init__(problem, fix)
        self.exit_code = 128 + signum
