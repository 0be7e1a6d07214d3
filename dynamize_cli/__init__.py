"""The `dynamize` command line: thin Typer commands over the dynamize library."""
