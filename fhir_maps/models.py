"""The mapped JSON as ``fhir.resources`` models (optional; the JSON is what goes on the wire).

fhir.resources 8.x models FHIR R5 in ``fhir.resources`` and R4B (4.3.0) in
``fhir.resources.R4B``. R4B has the same ImagingStudy, Endpoint and Patient structure as R4
(4.0.1), so R4 output is validated and modelled with the R4B classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir.resources import get_fhir_model_class as r5_model_class
from fhir.resources.R4B import get_fhir_model_class as r4b_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel

from fhir_maps.errors import MappingError
from fhir_maps.facts import FhirVersion


def to_model(resource: Mapping[str, Any], version: FhirVersion = "R4") -> FHIRAbstractModel:
    """Parse and validate mapped JSON with the fhir.resources model of its type.

    Parameters
    ----------
    resource
        A resource as returned by the builders.
    version
        ``"R4"`` (validated with the R4B models) or ``"R5"``.

    Returns
    -------
    FHIRAbstractModel
        E.g. ``fhir.resources.R4B.imagingstudy.ImagingStudy``.

    Raises
    ------
    MappingError
        The resource has no known ``resourceType``.
    pydantic.ValidationError
        The JSON does not conform to the model (cardinality, types, required elements).
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise MappingError("the resource has no resourceType")
    try:
        model = (r4b_model_class if version == "R4" else r5_model_class)(resource_type)
    except (KeyError, ValueError) as exc:
        raise MappingError(f"unknown resourceType {resource_type!r}") from exc
    return model.model_validate(dict(resource))
