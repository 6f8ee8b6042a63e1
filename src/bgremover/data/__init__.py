"""CamVid data: constants (cheap to import) and the datamodule (imported on first use, since it pulls in torch)."""

from bgremover.data.classes import (
    CLASSES,
    DEFAULT_FOREGROUND,
    MEAN,
    NUM_CLASSES,
    PALETTE,
    STD,
    VOID,
    colorize,
)

__all__ = [
    "CLASSES", "DEFAULT_FOREGROUND", "MEAN", "NUM_CLASSES", "PALETTE", "STD", "VOID", "colorize",
    "CamVidDataModule", "CamVidDataset", "CamVidError", "FolderDataModule", "ResidentCamVidDataModule",
    "verify_root",
]


def __getattr__(name: str):
    # PEP 562: `from bgremover.data import CamVidDataModule` works, yet importing the constants stays torch-free.
    if name == "CamVidDataModule":
        from bgremover.data.datamodule import CamVidDataModule

        return CamVidDataModule
    if name == "FolderDataModule":
        from bgremover.data.folder_datamodule import FolderDataModule

        return FolderDataModule
    if name == "ResidentCamVidDataModule":
        from bgremover.data.resident import ResidentCamVidDataModule

        return ResidentCamVidDataModule
    if name in ("CamVidDataset", "CamVidError", "verify_root"):
        from bgremover.data import camvid

        return getattr(camvid, name)
    raise AttributeError(f"module 'bgremover.data' has no attribute {name!r}")
