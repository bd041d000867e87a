"""One error type for every mistake a user can make.

The CLI turns an :class:`FfkvError` into a single line ``ffkv: error: <problem>. <fix>`` and exit
code 2, never a traceback. Library code raises it with a message that names the problem *and* the fix.
"""


class FfkvError(Exception):
    """A user-facing error: bad input, unsupported model, corrupt file, out-of-range layer."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        fix = self.fix.rstrip(".") if self.fix else ""
        return f"{self.problem}." + (f" {fix[:1].upper()}{fix[1:]}." if fix else "")


class UnsupportedArchitecture(FfkvError):
    pass


class AdapterCheckFailed(FfkvError):
    pass
