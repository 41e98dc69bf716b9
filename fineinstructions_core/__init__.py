"""FineInstructions as a plain library: every stage of the method, usable without Dagster."""

__version__ = "0.1.0"
