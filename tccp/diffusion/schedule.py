"""DDPM noise schedule (paper Table 3: linear betas, 1000 steps, eps prediction).

`Schedule` owns the prediction parameterisation too, so samplers and the loss can
convert a raw model output into x0 / eps without knowing which one the model emits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Schedule"]


@dataclass
class Schedule:
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"  # "eps" | "v"
    # timestep placement of few-step samplers: "logsnr" (uniform in log sigma, default)
    # or "trailing" (uniform in t). On the linear schedule uniform-in-t spends nearly all
    # steps at high noise and blurs fine detail: with an exact denoiser on Gaussian
    # data of std 0.1, 10 DPM++ steps reproduce 28 % of the spread with "trailing" and
    # 100 % with "logsnr".
    spacing: str = "logsnr"
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.spacing not in ("logsnr", "trailing"):
            raise ValueError(f"spacing must be 'logsnr' or 'trailing', got {self.spacing!r}")
        # DDPM's linear schedule, rescaled so that other T keep the same total noise
        scale = 1000.0 / self.num_steps
        betas = torch.linspace(self.beta_start * scale, self.beta_end * scale, self.num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("alphas_cumprod", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        return cls(**{k: d[k] for k in ("num_steps", "beta_start", "beta_end", "prediction", "spacing") if k in d})

    # -- coefficients -------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t gathered for integer timesteps, shaped to broadcast over `like`."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output."""
        if self.prediction == "eps":
            return noise
        a = self.alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v

    def to_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a model output at (x_t, t) into (x0, eps) estimates."""
        a = self.alpha_bar(t, x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - s1a * eps) / sa
        else:
            x0 = sa * x_t - s1a * out
            eps = s1a * x_t + sa * out
        return x0, eps

    def timesteps(self, steps: int | None) -> list[int]:
        """Exactly `steps` distinct descending integer timesteps (all T for None or
        steps >= T). Always starts at T-1, where x_T ~ N(0, I) is a valid input, so any
        step count works, 1 included."""
        T = self.num_steps
        if steps is None or steps >= T:
            return list(range(T - 1, -1, -1))
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if self.spacing == "trailing":
            return [int(round(T - i * T / steps)) - 1 for i in range(steps)]
        ab = self.alphas_cumprod
        log_sigma = (0.5 * torch.log((1 - ab) / ab)).tolist()  # increasing in t
        ts: list[int] = []
        for i in range(steps):
            target = log_sigma[-1] + (log_sigma[0] - log_sigma[-1]) * i / max(steps - 1, 1)
            t = _interp_index(log_sigma, target)
            ts.append(min(t, ts[-1] - 1) if ts else t)
        for i in range(steps - 1, -1, -1):  # keep them distinct and >= 0 at the low end
            ts[i] = max(ts[i], steps - 1 - i, ts[i + 1] + 1 if i + 1 < steps else 0)
        return ts


def _interp_index(increasing: list[float], value: float) -> int:
    """Nearest (rounded, linearly interpolated) index of `value` in an increasing list."""
    import bisect

    j = bisect.bisect_left(increasing, value)
    if j <= 0:
        return 0
    if j >= len(increasing):
        return len(increasing) - 1
    lo, hi = increasing[j - 1], increasing[j]
    return int(round(j - 1 + (value - lo) / (hi - lo)))
