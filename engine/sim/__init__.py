"""Fleet simulator: realistic wire records for the programme (`genki simulate`)."""

from engine.sim.config import SimConfig
from engine.sim.manifest import SimManifest
from engine.sim.simulate import simulate

__all__ = ["SimConfig", "SimManifest", "simulate"]
