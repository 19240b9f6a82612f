"""Located problems: one class for the config file, the policy files and flags."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

Severity = Literal["error", "warning"]

#: The pseudo file name of issues raised by command-line flags.
COMMAND_LINE: Final = "<command line>"


@dataclass(frozen=True, slots=True)
class Issue:
    """One error or warning, located in a file (1-based; line 0 = no position).

    Line 0 is for what has no place in the file: a file that cannot be
    read, something missing from the whole file, or a command-line flag
    (file :data:`COMMAND_LINE`).
    """

    file: str
    line: int
    column: int
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        if self.line > 0:
            return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"
        return f"{self.file}: {self.severity}: {self.message}"


class IssueError(Exception):
    """A file (or the flags) is invalid.

    ``issues`` holds every error found (and any warnings found alongside
    them), in file order; ``str()`` lists them one per line.
    """

    issues: tuple[Issue, ...]

    def __init__(self, issues: Iterable[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__(str(self))

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(issue for issue in self.issues if issue.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(issue for issue in self.issues if issue.severity == "warning")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def has_errors(issues: Iterable[Issue]) -> bool:
    return any(issue.severity == "error" for issue in issues)
