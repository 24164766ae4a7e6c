"""geosteer: learned steering geometries of language models.

The public API. The subpackages are `geosteer.models` (networks, metrics, solvers, the intervention),
`geosteer.data` (tasks, the activation store, distance targets) and `geosteer.pipeline` (the stages).

    from geosteer import load_geometry
    geometry = load_geometry("outputs/default/geometry/weekdays/gaga_out")  # the class its config names
"""

from geosteer.models.gaga import GAGA
from geosteer.models.geodesic_bridge import GeodesicBridge
from geosteer.models.geodesics import PCA, LabelledSpline, lbfgs_geodesic, linear_path, path_energy
from geosteer.models.hub import CheckpointError, GeometryMismatch, PushError, load_geometry, push_geometry
from geosteer.models.innsteer import InnSteer
from geosteer.models.metrics import EncoderPullback, FisherPullback, Metric, OutputPullback, pullback_of
from geosteer.models.steer import Steering
from geosteer.models.steering import intervene, steer
from geosteer.models.tail import CarrierTail

__all__ = [
    "GAGA",
    "CarrierTail",
    "CheckpointError",
    "EncoderPullback",
    "FisherPullback",
    "GeodesicBridge",
    "GeometryMismatch",
    "InnSteer",
    "LabelledSpline",
    "Metric",
    "OutputPullback",
    "PCA",
    "PushError",
    "Steering",
    "intervene",
    "lbfgs_geodesic",
    "linear_path",
    "load_geometry",
    "path_energy",
    "pullback_of",
    "push_geometry",
    "steer",
]
