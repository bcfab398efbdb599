"""The loop fluids' properties live in plc_io.fluids (the controller's metering uses them too)."""

from plc_io.fluids import (
    FLUIDS,
    Fluid,
    cp_kj_kgk,
    density_kg_m3,
    rcp_coeffs,
    vol_enthalpy_kj_m3,
    vol_heat_capacity_kj_m3k,
)

__all__ = [
    "FLUIDS",
    "Fluid",
    "cp_kj_kgk",
    "density_kg_m3",
    "rcp_coeffs",
    "vol_enthalpy_kj_m3",
    "vol_heat_capacity_kj_m3k",
]
