"""The ``cacovid-rl`` command: the shell around the library (``cacovid_rl``) and its Ray layers.

Imports go one way: this package may import ``cacovid_rl``, ``actors`` and ``learner``; none of them imports it
(``tests/unit/test_import_layers.py``). ``main`` holds the parser and the dispatch, one module per group of
subcommands holds their options and code.
"""
