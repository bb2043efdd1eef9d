"""Benchmark programs (levels side by side, against llama.cpp, the QA set, the document cache, the UI),
their corpus and QA set, and the helpers they share."""
