"""What the benchmarks print about the machine they ran on (``detrkit.machine``)."""

from detrkit.machine import cpu_model, describe

__all__ = ["cpu_model", "describe"]
