"""Flow-matching Euler schedule of Lens, identical to diffusers' FlowMatchEulerDiscreteScheduler.

The schedule is computed once on the host in numpy, with the same float32 arithmetic as
diffusers (its `set_timesteps` casts the sigmas to float32 before the exponential shift), so
sigmas and timesteps match bit for bit; the Euler update itself runs inside the jitted loop.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import jax
import numpy as np

__all__ = ["SchedulerConfig", "compute_empirical_mu", "schedule", "euler_step"]


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of `scheduler/scheduler_config.json` that Lens uses."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self):
        unsupported = [n for n in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "stochastic_sampling") if getattr(self, n)]
        if unsupported or self.time_shift_type not in ("exponential", "linear"):
            raise NotImplementedError(
                f"scheduler options not used by Lens are not implemented: {unsupported or self.time_shift_type}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SchedulerConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Lens' resolution- and step-dependent shift (float64, as upstream)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def schedule(num_steps: int, image_seq_len: int, config: SchedulerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (sigmas [N+1] with a terminal 0, timesteps [N] = sigma * 1000), both float32."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {num_steps}.")
    config = config or SchedulerConfig()
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        mu = compute_empirical_mu(image_seq_len, num_steps)
        if config.time_shift_type == "exponential":
            e = math.exp(mu)
            sigmas = e / (e + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(config.num_train_timesteps)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def euler_step(sample: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x <- x + (sigma_next - sigma) * v, in float32 like diffusers."""
    return sample.astype(np.float32) + (sigma_next - sigma).astype(np.float32) * velocity.astype(np.float32)
