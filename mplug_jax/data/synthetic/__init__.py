"""Built-in synthetic datasets (no files, no downloads), one module per kind of data."""
