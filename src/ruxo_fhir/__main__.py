"""`python -m ruxo_fhir` runs the CLI."""
from ruxo_fhir.cli import main

main()
