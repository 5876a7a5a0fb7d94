"""Developer tools: small random-weight checkpoints and tokenizers built locally (tiny_model),
the training of the server's default model pair (train, on stdlib_corpus), benchmark
workloads (workload).

Nothing is imported here, so that `python -m pagedserve.devtools.<tool>` stays light."""
