"""User-facing errors: what was expected, what was found, what to do."""

__all__ = ["SparktuneError", "ConfigError"]


class SparktuneError(Exception):
    """An error caused by user input or environment, reported without a traceback by the CLI."""


class ConfigError(SparktuneError):
    """One or more configuration problems, collected and raised together."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} configuration problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
