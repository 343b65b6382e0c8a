"""K2's optimizer: MuonClip (Muon + RMS matching + MLA-aware QK-Clip). See rlk2/optim/README.md."""

from rlk2.optim.muon import Routing, newton_schulz, ns_dtype, route_parameters
from rlk2.optim.muonclip import MuonClip

__all__ = ["MuonClip", "Routing", "newton_schulz", "ns_dtype", "route_parameters"]
