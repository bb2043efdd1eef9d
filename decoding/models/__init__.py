"""Where weights come from: the catalogue of known models and their verified pull, the GGUF reader, and
loading (catalogue names, .gguf files, folders) with the load-time self-check."""
