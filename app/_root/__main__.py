"""`python -m triforce_chat`: the same CLI as the `triforce-chat` script.

`triforce_chat` is a namespace package (pyproject.toml maps this folder to it, and `app/`,
`decoding/`, `kernels/`, `themes/` below it). None of those folders has an `__init__.py`, so none is
a regular top-level package: run from the repository root, `import kernels` (as transformers does
when Hugging Face's `kernels` package is installed) finds that package, never our folder.
"""

from triforce_chat.app.cli.main import main

main()
