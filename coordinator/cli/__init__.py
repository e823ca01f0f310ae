"""The fedmq command line (typer): one module per command group."""
