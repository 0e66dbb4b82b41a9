"""Sphinx configuration of twisted_novnc's manual (``make docs``; built with -W in the tests)."""

project = "twisted_novnc"
copyright = "twisted_novnc contributors, MIT licence"  # noqa: A001  (Sphinx's name)
extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
# Reference pages quote config keys, SQL and shell lines as literals, never as code to
# highlight: no default language, so a literal block is never mis-lexed into a warning.
highlight_language = "none"
