"""Temperature-dependent properties of the loop fluids (water, PG25) as small polynomials."""

from __future__ import annotations

from typing import Literal

Fluid = Literal["water", "pg25"]

# Quadratic fits, T in °C, valid 0..90 °C. Water: IAPWS-95 tabulated values 10..80 °C
# (fit error < 0.25 kg/m³, < 0.003 kJ/(kg K)). PG25 (25 % propylene glycol by mass):
# ASHRAE Handbook Fundamentals, ch. 31 tables, read to about ±1 %.
_DENSITY_KG_M3: dict[str, tuple[float, float, float]] = {
    "water": (1001.02143, -0.0757142857, -0.00364285714),
    "pg25": (1026.0, -0.25, -0.0025),
}
_CP_KJ_KGK: dict[str, tuple[float, float, float]] = {
    "water": (4.19864286, -0.000986904762, 0.0000122619048),
    "pg25": (3.89057143, 0.00199285714, -0.00000178571429),
}


def _product(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return tuple(out)


# rho*cp as one quartic, so the volumetric heat capacity is a single Horner evaluation in the
# plant's hot path, and its exact integral (the volumetric enthalpy) is available for checks.
_RCP: dict[str, tuple[float, ...]] = {
    f: _product(_DENSITY_KG_M3[f], _CP_KJ_KGK[f]) for f in _CP_KJ_KGK
}
_RCP_INT: dict[str, tuple[float, ...]] = {
    f: (0.0, *(c / (i + 1) for i, c in enumerate(cs))) for f, cs in _RCP.items()
}
FLUIDS: tuple[str, ...] = tuple(_RCP)


def _horner(coeffs: tuple[float, ...], x: float) -> float:
    acc = 0.0
    for c in reversed(coeffs):
        acc = acc * x + c
    return acc


def density_kg_m3(fluid: Fluid, temp_c: float) -> float:
    """Density of the fluid at temp_c."""
    return _horner(_DENSITY_KG_M3[fluid], temp_c)


def cp_kj_kgk(fluid: Fluid, temp_c: float) -> float:
    """Specific heat capacity at temp_c."""
    return _horner(_CP_KJ_KGK[fluid], temp_c)


def rcp_coeffs(fluid: Fluid) -> tuple[float, float, float, float, float]:
    """Coefficients c0..c4 of rho*cp(T) in kJ/(m³ K), for inlined evaluation in hot loops."""
    c = _RCP[fluid]
    return (c[0], c[1], c[2], c[3], c[4])


def vol_heat_capacity_kj_m3k(fluid: Fluid, temp_c: float) -> float:
    """Volumetric heat capacity rho*cp at temp_c."""
    return _horner(_RCP[fluid], temp_c)


def vol_enthalpy_kj_m3(fluid: Fluid, temp_c: float) -> float:
    """Volumetric enthalpy relative to 0 °C: the integral of rho*cp from 0 °C to temp_c."""
    return _horner(_RCP_INT[fluid], temp_c)


def density_coeffs(fluid: Fluid) -> tuple[float, float, float]:
    """Coefficients c0..c2 of the density (kg/m³) in T (°C), for inlined evaluation."""
    c = _DENSITY_KG_M3[fluid]
    return (c[0], c[1], c[2])


def cp_coeffs(fluid: Fluid) -> tuple[float, float, float]:
    """Coefficients c0..c2 of cp (kJ/(kg K)) in T (°C), for inlined evaluation."""
    c = _CP_KJ_KGK[fluid]
    return (c[0], c[1], c[2])


def vol_enthalpy_coeffs(fluid: Fluid) -> tuple[float, float, float, float, float, float]:
    """Coefficients c0..c5 of the volumetric enthalpy (kJ/m³ from 0 °C) in T (°C)."""
    c = _RCP_INT[fluid]
    return (c[0], c[1], c[2], c[3], c[4], c[5])
