"""The offline demo: handwritten digits shipped in the package, and the held-out samples `make demo` predicts."""
