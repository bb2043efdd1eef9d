"""The document cache: prefilled keys/values saved on disk (docstore: files, manifests, cap; torch-free)
and restored into a session's KV cache (doccache)."""
