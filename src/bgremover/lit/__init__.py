from bgremover.lit.module import CHECKPOINT_KEY, SegmentationModule

__all__ = ["CHECKPOINT_KEY", "SegmentationModule"]
