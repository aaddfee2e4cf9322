"""The executor (the hands): the only part that calls connectors."""

from farmhand.executor.loop import Executor, ExecutorStats

__all__ = ["Executor", "ExecutorStats"]
