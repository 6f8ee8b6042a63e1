"""bgremover: CamVid segmentation experiments (Lightning + Hydra) and an ONNX background remover."""

__version__ = "0.1.0"
