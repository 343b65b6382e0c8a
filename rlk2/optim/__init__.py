"""K2's optimizer: MuonClip (Muon + RMS matching + MLA-aware QK-Clip). See rlk2/optim/README.md.

- `muon`: Newton-Schulz, the RMS-matching scale and `route_parameters` (which parameter Muon gets, asserted).
- `qk_clip`: per-head max-logit recording and the MLA / MHA / GQA rescaling rules.
- `muonclip`: `MuonClip`, the optimizer that ties them together.
- `build`: `build_optimizer`, the run's optimizer by name (`muonclip` or torch's `adamw`).
"""

from rlk2.optim.build import build_optimizer
from rlk2.optim.muon import Routing, newton_schulz, ns_dtype, route_parameters
from rlk2.optim.muonclip import MuonClip

__all__ = ["MuonClip", "Routing", "build_optimizer", "newton_schulz", "ns_dtype", "route_parameters"]
