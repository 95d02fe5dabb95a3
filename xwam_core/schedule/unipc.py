"""UniPC for flow matching with its per-step coefficients computed once: diffusers' arithmetic, less overhead.

diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
solver_type="bh2", predict_x0=True, lower_order_final=True)` recomputes ~100 scalar tensor ops and
about 20 full-size tensor ops per step (1-2 ms on a CPU even for tiny tensors, tens of ms for a video
latent). Every one of its updates is a fixed linear combination of the corrected sample and the last
few x0-predictions, with weights that depend only on the sigma schedule. `FlowUniPC` computes those
weights once (float64, the same formulas) and applies each step as a handful of in-place
multiply-adds into preallocated buffers. Tests check it against diffusers' `step` on random inputs.

Notation, step i from sigma_i to sigma_{i+1} (x_sigma = (1 - sigma) x0 + sigma eps):
    m_i  = x_i - sigma_i v_i                       x0-prediction from the model's velocity
    xc_i = a xc_{i-1} + sum_j c_j m_{i-j}           UniC corrector (i >= 1; xc_0 = x_0)
    x_{i+1} = p xc_i + sum_j d_j m_{i-j}           UniP predictor
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _lambda(sigma: float) -> float:
    """Half log-SNR of flow matching, log(alpha / sigma) with alpha = 1 - sigma (inf at sigma = 0)."""
    return math.inf if sigma == 0 else math.log(1.0 - sigma) - math.log(sigma)


def _bh2_weights(h: float, rks: list[float], order: int, corrector: bool) -> tuple[float, float, np.ndarray]:
    """(h_phi_1, B_h, rhos) of UniPC-bh2 with x0-prediction, as diffusers computes them."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    if order == 1 and not corrector:
        return h_phi_1, b_h, np.zeros(0)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rk = np.array([*rks, 1.0])
    rows, b = [], []
    for n in range(1, order + 1):
        rows.append(rk ** (n - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r_mat, b_vec = np.stack(rows), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r_mat, b_vec)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
    return h_phi_1, b_h, rhos


class FlowUniPC:
    """Multistep UniPC (bh2, x0-prediction) over a given flow sigma schedule, coefficients precomputed.

    `sigmas` (T + 1,) decreasing to 0, e.g. a diffusers scheduler's `.sigmas`. Call `start()` before a
    new trajectory, then `step(i, velocity, sample, out)` for i = 0..T-1.
    """

    def __init__(self, sigmas: torch.Tensor | list[float], solver_order: int = 2):
        sig = [float(s) for s in sigmas]
        self.num_steps = len(sig) - 1
        self.solver_order = solver_order
        self.sigmas = sig
        lam = [_lambda(s) for s in sig]
        # Order per step: warm-up (i + 1) and lower order at the end, like diffusers' lower_order_final.
        self.orders = [min(solver_order, self.num_steps - i, i + 1) for i in range(self.num_steps)]
        # predictor[i] = (p, [d_0, d_1, ...]) on xc_i and m_i, m_{i-1}, ...
        self.predictor: list[tuple[float, list[float]]] = []
        # corrector[i] = (a, [c_0, c_1, ...]) on xc_{i-1} and m_i, m_{i-1}, ...; None at i = 0
        self.corrector: list[tuple[float, list[float]] | None] = [None]
        for i in range(self.num_steps):
            self.predictor.append(self._predictor(i, lam))
            if i > 0:
                self.corrector.append(self._corrector(i, lam))
        self._buffers: dict[str, torch.Tensor | list[torch.Tensor]] = {}

    def _predictor(self, i: int, lam: list[float]) -> tuple[float, list[float]]:
        order, s0, st = self.orders[i], self.sigmas[i], self.sigmas[i + 1]
        alpha_t = 1.0 - st
        if st == 0:  # last step, order 1: x_T = m_{T-1} (diffusers' limit, without the inf/inf)
            return 0.0, [1.0]
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - j] - lam[i]) / h for j in range(1, order)]
        h_phi_1, b_h, rhos = _bh2_weights(h, rks, order, corrector=False)
        d = [-alpha_t * h_phi_1] + [0.0] * (order - 1)
        for j in range(1, order):  # D1_j = (m_{i-j} - m_i) / rk_j
            w = -alpha_t * b_h * rhos[j - 1] / rks[j - 1]
            d[j] += w
            d[0] -= w
        return st / s0, d

    def _corrector(self, i: int, lam: list[float]) -> tuple[float, list[float]]:
        order, s0, st = self.orders[i - 1], self.sigmas[i - 1], self.sigmas[i]
        alpha_t = 1.0 - st
        h = lam[i] - lam[i - 1]
        rks = [(lam[i - 1 - j] - lam[i - 1]) / h for j in range(1, order)]
        h_phi_1, b_h, rhos = _bh2_weights(h, rks, order, corrector=True)
        c = [0.0] * (order + 1)  # on m_i, m_{i-1}, ..., m_{i-order}
        c[1] = -alpha_t * h_phi_1
        for j in range(1, order):  # D1_j = (m_{i-1-j} - m_{i-1}) / rk_j
            w = -alpha_t * b_h * rhos[j - 1] / rks[j - 1]
            c[1 + j] += w
            c[1] -= w
        w = -alpha_t * b_h * rhos[-1]  # D1_t = m_i - m_{i-1}
        c[0] += w
        c[1] -= w
        return st / s0, c

    def start(self, like: torch.Tensor) -> None:
        """Reset for a new trajectory; (re)allocate buffers shaped like `like` when they do not fit."""
        xc = self._buffers.get("xc")
        if not (
            isinstance(xc, torch.Tensor)
            and xc.shape == like.shape
            and xc.dtype == like.dtype
            and xc.device == like.device
            and (torch.is_inference_mode_enabled() or not xc.is_inference())  # RTC steps outside it
        ):
            self._buffers = {
                "xc": torch.empty_like(like, memory_format=torch.contiguous_format),
                "m": [
                    torch.empty_like(like, memory_format=torch.contiguous_format)
                    for _ in range(self.solver_order + 1)
                ],
            }

    def step(
        self, i: int, velocity: torch.Tensor, sample: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_{i+1} from x_i = `sample` and the model's velocity at it; written into `out` (may be `sample`)."""
        xc = self._buffers["xc"]
        ring = self._buffers["m"]
        assert isinstance(xc, torch.Tensor) and isinstance(ring, list)
        slots = len(ring)
        m_i = ring[i % slots]
        torch.add(sample, velocity, alpha=-self.sigmas[i], out=m_i)  # m_i = x_i - sigma_i v_i
        corrector = self.corrector[i]
        if corrector is None:
            xc.copy_(sample)
        else:
            a, weights = corrector
            xc.mul_(a)
            for j, w in enumerate(weights):
                xc.add_(ring[(i - j) % slots], alpha=w)
        p, weights = self.predictor[i]
        if out is None:
            out = torch.empty_like(sample)
        torch.mul(xc, p, out=out)
        for j, w in enumerate(weights):
            out.add_(ring[(i - j) % slots], alpha=w)
        return out
