"""`python -m controlplane` runs the meshline CLI."""

from controlplane.cli import main

main()
