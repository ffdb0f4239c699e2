"""asyncproc: a supervised worker pool that fills an LLM inference pool's slack from queues."""

__version__ = "0.1.0"
