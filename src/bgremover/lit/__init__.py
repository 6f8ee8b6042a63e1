from bgremover.checkpoint import CHECKPOINT_KEY
from bgremover.lit.module import SegmentationModule

__all__ = ["CHECKPOINT_KEY", "SegmentationModule"]
