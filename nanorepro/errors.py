"""The one error type users see: a problem and the fix, printed as one line by the CLI."""


class UserError(Exception):
    """Bad input or an unmet requirement. The CLI prints it as one line and exits with 2."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} (fix: {fix})" if fix else problem)
