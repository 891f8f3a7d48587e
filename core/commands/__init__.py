"""`python -m core <command>`: one module per command, each with add_arguments(parser) and run(args) -> int; terminal.py
draws their progress lines."""
