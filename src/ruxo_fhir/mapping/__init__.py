"""Mapping stage: declarative mapping files, case record -> FHIR and back."""
from ruxo_fhir.mapping.spec import MappingSpec, default_mapping_path, load_mapping

__all__ = ["MappingSpec", "default_mapping_path", "load_mapping"]
