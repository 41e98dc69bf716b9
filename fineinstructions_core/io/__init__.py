"""Readers for sources and corpora, the Parquet lake and the DuckDB catalog over it."""
