"""The one error type users see: a problem and the fix, printed as one line by the CLI."""


class UserError(Exception):
    """Bad input or an unmet requirement. The CLI prints it as one line and exits with 2."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)


class ModelUnavailable(UserError):
    """Pretrained weights that cannot be had here (no network, not cached). The CLI exits with 3 so
    a pipeline can record the stage as not run and go on."""
