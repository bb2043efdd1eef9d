"""The Textual chat UI: the app, its screens and widgets, the worker jobs and the messages between them."""
