"""Linear datamodels: ``M(z) ≈ β₀ + zᵀβ`` fitted by least squares, ridge or lasso.

Lasso (and the elastic net with ``ridge``) by coordinate descent, no sklearn; the
intercept is never penalised (the design is centred).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class LinearDatamodel:
    """``M(z) ≈ intercept + z @ beta``.

    Attributes:
        beta: ``[C]`` (or ``[C, T]`` for several targets) float64 coefficients.
        intercept: Scalar (or ``[T]``).
    """

    beta: np.ndarray
    intercept: np.ndarray | float

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """``[S, C]`` masks -> ``[S]`` (or ``[S, T]``) predictions."""
        return np.asarray(masks, dtype=np.float64) @ self.beta + self.intercept


def _lasso_cd(x: np.ndarray, y: np.ndarray, lam1: float, lam2: float, *, max_iter: int, tol: float) -> np.ndarray:
    """Coordinate descent for (1/2S)‖y−Xβ‖² + λ₁‖β‖₁ + (λ₂/2S)‖β‖² on centred X, y."""
    s, c = x.shape
    beta = np.zeros(c)
    resid = y.copy()
    col_sq = (x * x).sum(0) / s
    denom = col_sq + lam2 / s
    for _ in range(max_iter):
        max_delta = 0.0
        for j in range(c):
            if denom[j] == 0:
                continue
            old = beta[j]
            rho = x[:, j] @ resid / s + col_sq[j] * old
            new = np.sign(rho) * max(abs(rho) - lam1, 0.0) / denom[j]
            if new != old:
                resid -= x[:, j] * (new - old)
                beta[j] = new
                max_delta = max(max_delta, abs(new - old))
        if max_delta <= tol * max(1.0, np.abs(beta).max()):
            break
    return beta


def fit_linear_datamodel(
    masks: np.ndarray,
    values: np.ndarray,
    *,
    ridge: float = 0.0,
    lasso: float = 0.0,
    max_iter: int = 10_000,
    tol: float = 1e-10,
) -> LinearDatamodel:
    """Least-squares fit of ``values ≈ β₀ + masks @ β`` (intercept unpenalised).

    Args:
        masks: ``[S, C]`` bool/0-1 design.
        values: ``[S]`` or ``[S, T]`` measured metrics.
        ridge: λ₂ of ``(1/2)‖y−Xβ‖² + (λ₂/2)‖β‖²`` (closed form without lasso).
        lasso: λ₁ per subset (coordinate descent, with ``ridge`` as the elastic-net term).
        max_iter: Coordinate-descent sweeps.
        tol: Stop when no coefficient moves by more than ``tol`` (relative).

    Returns:
        The :class:`LinearDatamodel`; with ``S < C`` and no penalty, the minimum-norm
        least-squares solution.
    """
    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    squeeze = y.ndim == 1
    y2 = y[:, None] if squeeze else y
    if x.ndim != 2 or y2.shape[0] != x.shape[0]:
        raise ValueError(f"masks [S, C] and values [S(, T)] disagree: {x.shape} vs {y.shape}")
    xm, ym = x.mean(0), y2.mean(0)
    xc, yc = x - xm, y2 - ym
    if lasso > 0:
        beta = np.stack([_lasso_cd(xc, yc[:, t], lasso, ridge, max_iter=max_iter, tol=tol)
                         for t in range(yc.shape[1])], axis=1)
    elif ridge > 0:
        c = x.shape[1]
        beta = np.linalg.solve(xc.T @ xc + ridge * np.eye(c), xc.T @ yc)
    else:
        beta = np.linalg.lstsq(xc, yc, rcond=None)[0]
    intercept = ym - xm @ beta
    if squeeze:
        return LinearDatamodel(beta=beta[:, 0], intercept=float(intercept[0]))
    return LinearDatamodel(beta=beta, intercept=intercept)
