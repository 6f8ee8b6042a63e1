"""Segmentation nets: our FC-DenseNet, smp's DeepLabs, and the two registries that name them.

Training builds nets through Hydra's `_target_` (conf/model/*.yaml). Everything else goes through a registry:
`NETS` (name → builder) for code that wants a net by name (benchmarks, tests), and `BY_TARGET` (the `_target_`
strings of conf/model → builder) for rebuilding a net from a checkpoint's config: only these classes are ever
built from a file (bgremover.checkpoint).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from torch import nn

from bgremover.errors import UserError
from bgremover.nets.tiramisu import FCDenseNet, count_parameters, fcdensenet56, fcdensenet67, fcdensenet103

HF_HOST = ("huggingface.co", 443)  # where smp fetches encoder weights from
NETWORK_PROBE_TIMEOUT_S = 3.0  # how long we wait to learn there is no network, instead of smp's ~20 s hang


def _smp(arch: str, encoder: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 11, **kw) -> nn.Module:
        import segmentation_models_pytorch as smp

        kw.setdefault("encoder_weights", None)
        return getattr(smp, arch)(encoder_name=encoder, classes=num_classes, **kw)

    return build


NETS: dict[str, Callable[..., nn.Module]] = {
    "tiramisu56": fcdensenet56,
    "tiramisu67": fcdensenet67,
    "tiramisu103": fcdensenet103,
    "deeplabv3_resnet18": _smp("DeepLabV3", "resnet18"),
    "deeplabv3plus_resnet18": _smp("DeepLabV3Plus", "resnet18"),
    "deeplabv3plus_mobilenet_v2": _smp("DeepLabV3Plus", "mobilenet_v2"),
}


def _smp_class(arch: str) -> Callable[..., nn.Module]:
    def build(**kw) -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(**kw)

    return build


BY_TARGET: dict[str, Callable[..., nn.Module]] = {
    "bgremover.nets.FCDenseNet": FCDenseNet,
    "bgremover.nets.tiramisu.FCDenseNet": FCDenseNet,
    "segmentation_models_pytorch.DeepLabV3": _smp_class("DeepLabV3"),
    "segmentation_models_pytorch.DeepLabV3Plus": _smp_class("DeepLabV3Plus"),
}


def build_net(name: str, **kwargs) -> nn.Module:
    if name not in NETS:
        raise KeyError(f"unknown net '{name}'; choose one of: {', '.join(NETS)}")
    return NETS[name](**kwargs)


def check_encoder(net_cfg: Mapping) -> None:
    """An smp net's encoder_name (and encoder_weights) is one smp can build: an unknown one failed while the net was
    built, after the run folder was made, and left a failed run behind (every other bad setting is refused first)."""
    if not str(net_cfg.get("_target_", "")).startswith("segmentation_models_pytorch"):
        return
    name = str(net_cfg.get("encoder_name", "resnet34"))
    weights = net_cfg.get("encoder_weights")
    from segmentation_models_pytorch.encoders import encoders

    if name.startswith("tu-"):  # smp's timm encoders: tu-<timm model>; their weights are true or null
        import timm

        if not timm.is_model(name[3:]):
            raise UserError(f"model.net.encoder_name={name}: timm has no model {name[3:]!r} (tu-<name> builds a "
                            "timm model as the encoder)")
        return
    if name not in encoders:
        import difflib

        close = difflib.get_close_matches(name, list(encoders), n=3)
        raise UserError(f"model.net.encoder_name={name} is not an encoder segmentation_models_pytorch knows"
                        + (f" (closest: {', '.join(close)})" if close else "")
                        + f": choose one of its {len(encoders)} (mobilenet_v2, resnet18, resnet34, resnet50, …: "
                        "segmentation_models_pytorch.encoders.get_encoder_names()) or tu-<timm model>")
    known = encoders[name].get("pretrained_settings") or {}
    if weights and weights not in known:
        raise UserError(f"model.net.encoder_weights={weights} is not a weight set of encoder {name} (it has: "
                        f"{', '.join(known) or 'none'}; or null: random weights)")


class PretrainedWeightsUnavailable(UserError):
    """Raised before smp starts a download that cannot succeed here."""


def ensure_pretrained_available(net_cfg: Mapping) -> None:
    """Fail in seconds, with one sentence, when an smp config asks for encoder weights that cannot be had.

    smp downloads weights from the Hugging Face hub; offline, that hangs for ~20 s and ends in a long traceback.
    Weights already in the local hub cache are fine, so we look there first and only then probe the network.
    """
    weights = net_cfg.get("encoder_weights")
    target = str(net_cfg.get("_target_", ""))
    if not weights or not target.startswith("segmentation_models_pytorch"):
        return
    encoder = str(net_cfg.get("encoder_name", "resnet34"))
    if encoder.startswith("tu-"):  # smp hands any non-null weights to timm, which fetches its own from the hub
        where = _timm_weights(encoder[3:])
        if where is None:
            return  # no pretrained weights, or from elsewhere than the hub: timm says so itself
        repo, revision, files = where
    else:
        from segmentation_models_pytorch.encoders import encoders

        settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get(weights)
        if settings is None:
            return  # unknown names and weights were refused before the build (check_encoder)
        repo, revision, files = settings["repo_id"], settings["revision"], ("model.safetensors",)
    from huggingface_hub import hf_hub_download

    for name in files:
        try:
            hf_hub_download(repo, name, revision=revision, local_files_only=True)
            return
        except Exception:  # not in the cache under this name: the next one (timm's safetensors, then its .bin)
            continue
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            socket.create_connection(HF_HOST, timeout=NETWORK_PROBE_TIMEOUT_S).close()
            return
        except OSError:
            pass
    raise PretrainedWeightsUnavailable(
        f"'{weights}' weights for encoder '{encoder}' are not in the local Hugging Face cache and "
        f"{HF_HOST[0]} cannot be reached: run the same command once on a machine with internet "
        f"(or copy its ~/.cache/huggingface/hub here, or point HF_HUB_CACHE at such a copy), "
        f"or train from scratch with model.net.encoder_weights=null."
    )


def _timm_weights(model: str) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(hub repo, revision, files timm looks for) of a timm model's pretrained weights (`resnet18` or
    `resnet18.a1_in1k`); None when it has none or takes them from elsewhere. Offline, timm's own download retried
    for ~45 s with a warning a try and ended in a line that named neither the setting nor the cure."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model)
    except Exception:  # an unknown tag: timm refuses it while building, in its own words
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    named = getattr(cfg, "hf_hub_filename", None)
    return repo, revision or None, (named,) if named else ("model.safetensors", "pytorch_model.bin")


__all__ = [
    "FCDenseNet",
    "BY_TARGET",
    "NETS",
    "PretrainedWeightsUnavailable",
    "build_net",
    "check_encoder",
    "count_parameters",
    "ensure_pretrained_available",
    "fcdensenet56",
    "fcdensenet67",
    "fcdensenet103",
]
