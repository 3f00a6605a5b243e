"""`python -m lorafleet.cli ...`: the same as the `lorafleet` command."""

from lorafleet.cli.main import main

main()
