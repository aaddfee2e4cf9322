"""``python -m farmhand`` runs the CLI."""

from farmhand.cli.main import main

main()
