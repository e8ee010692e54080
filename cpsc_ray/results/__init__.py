"""Results as data: the Parquet schema and its config columns, publishing and reading them, the
analysis across runs and datasets, and the HTML report. Imports neither Ray nor torch."""
