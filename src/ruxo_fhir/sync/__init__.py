"""Sync stage: push resources to a FHIR server and pull the cohort back, safely."""
from ruxo_fhir.sync.ledger import Ledger
from ruxo_fhir.sync.pull import PullOptions, PullResult, filter_cohort, pull_cohort
from ruxo_fhir.sync.push import PushOptions, PushResult, push

__all__ = ["Ledger", "PullOptions", "PullResult", "PushOptions", "PushResult", "filter_cohort", "pull_cohort", "push"]
