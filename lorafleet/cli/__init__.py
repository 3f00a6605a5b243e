"""The `lorafleet` command line: the group in `main`, commands by kind in `jobs`, `adapters` and `remote`.

Commands import their implementation inside the command body, so `lorafleet --help` and spec errors stay instant.
"""
