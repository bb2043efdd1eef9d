"""The command line: `triforce-chat` (chat, ask, bench*, models, cache), one line and exit 2 per bad input."""
