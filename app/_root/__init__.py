"""triforce_chat: the top of the installed namespace (app, decoding, kernels, themes live below).

This folder is mapped to `triforce_chat` by pyproject.toml so that `python -m triforce_chat` works;
the project's top level keeps only the folders of the design card.
"""
