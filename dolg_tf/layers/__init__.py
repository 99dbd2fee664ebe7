"""DOLG layers, written with ``keras.ops`` and registered for serialization."""

from dolg_tf.layers.gem import GeM
from dolg_tf.layers.local_branch import LocalBranch
from dolg_tf.layers.margins import ArcFace, CurricularFace, SubCenterArcFace, dynamic_margins
from dolg_tf.layers.multi_atrous import MultiAtrous
from dolg_tf.layers.normalization import ImageNormalization, L2Normalize
from dolg_tf.layers.orthogonal_fusion import OrthogonalFusion

__all__ = [
    "ArcFace",
    "CurricularFace",
    "GeM",
    "ImageNormalization",
    "L2Normalize",
    "LocalBranch",
    "MultiAtrous",
    "OrthogonalFusion",
    "SubCenterArcFace",
    "dynamic_margins",
]
