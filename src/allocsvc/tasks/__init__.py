"""Background jobs and their scheduler."""

from allocsvc.tasks.scheduler import Scheduler

__all__ = ["Scheduler"]
