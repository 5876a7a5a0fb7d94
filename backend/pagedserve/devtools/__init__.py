"""Developer tools: small random-weight checkpoints and tokenizers built locally (tiny_model),
the server's default model (default_model), benchmark workloads (workload).

Nothing is imported here, so that `python -m pagedserve.devtools.<tool>` stays light."""
