"""`python -m layerline` runs the CLI."""

from .cli import main

main()
