"""Glue shared by train/eval: callbacks/loggers from config, one-line errors, summary.json, the run's
logging. The task wrapper and W&B: bgremover.task. A sweep's job lines and report: bgremover.sweep."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bgremover.config import SUMMARY_NAME, SWEEP_REPORT_NAME, overrides  # noqa: F401  (one definition; re-exported)
from bgremover.errors import PARTIAL, count, one_line  # noqa: F401  (PARTIAL re-exported)

log = logging.getLogger("bgremover")


# --- the CPU ---------------------------------------------------------------------------------------------------
def cpu_info() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this machine's CPU, from /proc/cpuinfo (empty where absent)."""
    import platform

    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):  # not Linux: no flags, so no native-bf16 claim
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields.get("model name") or platform.processor() or "unknown CPU", set(fields.get("flags", "").split())


def cpu_kind() -> str:
    """One line for benchmark output: model, logical CPUs and the instruction sets speed claims depend on."""
    name, flags = cpu_info()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} logical CPUs, {' '.join(isa) or 'no AVX2'}"


def device_kind(device: str) -> str:
    """One line for benchmark output naming what the figures are measured on: `gpu: <name>` for a CUDA device,
    `cpu: <cpu_kind()>` for the CPU. A device torch does not know (`gpu`), or a CUDA one this machine lacks, raises
    UserError: each benchmark checks its --device with this before any work, instead of a traceback or a table of
    failed cells."""
    import torch

    from bgremover.errors import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device}: not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but no CUDA device is available")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"gpu: {torch.cuda.get_device_name(dev)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    if dev.type != "cpu":
        raise UserError(f"--device {device}: the benchmarks run on cpu or cuda")
    return f"cpu: {cpu_kind()}"


# glibc settings for a CPU training process, read when it starts: keep freed memory in the heap for reuse instead of
# mapping every block over 32 MiB afresh (the kernel zeroing each page) and returning it on free, every step.
# Measured on the 2-core AVX-512-BF16 EPYC (README, "Flags to use"): DeepLabV3+/MobileNetV2 fp32 at batch 8, 224²
# trains 1.19x faster. A GPU's caching allocator does the same. The process keeps its peak heap until it exits.
KEEP_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}


# --- config resolvers ------------------------------------------------------------------------------------------
def cpu_precision() -> str:
    """Lightning precision for CPU training: bf16 autocast only where the CPU has native bf16.

    Measured on a 2-core AVX-512-BF16 EPYC: bf16-mixed trains FC-DenseNet103 1.7x faster than fp32 channels_last
    (1.502 vs 0.865 img/s, both with the fused kernels; docs/fast_tiramisu.md, "CPUs with bf16 units").
    DeepLabV3+/MobileNetV2 gains nothing reliable (session 22, same CPU kind, batch 8 at 224², AdamW, three
    alternations: fp32 9.9-10.3 img/s, bf16 8.5-11.6), so the DeepLab CPU recipes (cpu_quick, cpu_default,
    remover) pin fp32. On CPUs without bf16 units oneDNN emulates bf16 and single convolutions ran 10-50x slower
    than fp32, so fp32 it is there.
    """
    flags = cpu_info()[1]
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def tiramisu(variant: str, key: str):
    """`${tiramisu:fcdensenet103,down_blocks}`: the paper's architecture, defined once in
    bgremover.nets.tiramisu.TIRAMISU_CONFIGS; conf/model/tiramisu*.yaml read it from there."""
    from bgremover.nets.tiramisu import TIRAMISU_CONFIGS

    value = TIRAMISU_CONFIGS[variant][key]
    return list(value) if isinstance(value, tuple) else value


def shipped_model(name: str) -> str:
    """`${shipped_model:bgremover-camvid.pt}`: a file of the shipped models, in the checkout or where
    `pip install .` put them (<prefix>/share/bgremover/models), whatever the working directory."""
    from bgremover.remover import _shipped_models

    return str(_shipped_models() / name)


def source_commit() -> str | None:
    """The git commit of the code this process runs (`-dirty` when tracked files differ from it: the package's, and
    the checkout's conf/ and experiments/, whose recipes shape a run as much as the code does; an edited
    experiments/remover.yaml was recorded as the commit's clean recipe), for a run's record and its exported model;
    None outside a git checkout (an installed package) or without git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        # a wheel installed in a project's (git-ignored) .venv sits inside that project's checkout: its HEAD is not
        # this code's, and was recorded as the commit that trained the model. Only a tracked file of ours counts.
        ours = subprocess.run(["git", "-C", str(here), "ls-files", "--error-unmatch", "--", Path(__file__).name],
                              capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if ours.returncode or head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                "../../conf", "../../experiments"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", cpu_precision)
    if not OmegaConf.has_resolver("shipped_model"):
        OmegaConf.register_new_resolver("shipped_model", shipped_model)
    if not OmegaConf.has_resolver("tiramisu"):
        OmegaConf.register_new_resolver("tiramisu", tiramisu)


register_resolvers()


# --- errors ----------------------------------------------------------------------------------------------------
def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by what the user gave us: shown as one line, with no traceback."""
    from bgremover.errors import UserError

    return (UserError, FileNotFoundError, ValueError)


def error_summary(exc: BaseException) -> str:
    """What went wrong in a run, on one line, whole: the error's own message also when Hydra's instantiation wrapper
    or a DataLoader worker's traceback wraps it, prefixed by its type unless it is a user error."""
    from hydra.errors import InstantiationException

    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        # Hydra wraps the real error as "Error in call to target X:\n<error>": say the error, name the target.
        target = str(exc).splitlines()[0].split("'")[1::2][:1]
        if target and (key := _unknown_setting(exc.__cause__)):  # e.g. a speed-run's data settings with data=camvid
            typed = [k for k in (o.lstrip("+~").split("=", 1)[0] for o in overrides()) if k.endswith("." + key)]
            if typed:  # `+trainer.foo=1`: a key the command line adds, misspelt or unknown, not another choice's
                return f"{typed[0]} is not a setting of {target[0]}: the command line adds it (check its spelling)"
            return (f"{key} is not a setting of {target[0]}: the recipe or an override sets it for another choice "
                    "of that config group")
        inner = error_summary(exc.__cause__)
        return f"{inner} (while building {target[0]})" if target else inner
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch re-raises worker errors with the worker's traceback as message
        text = text.rstrip().splitlines()[-1]
        text = text.split(": ", 1)[1] if ": " in text else text
    first = one_line(text, limit=None)
    return first if isinstance(exc, user_error_types()) else f"{type(exc).__name__}: {first}"


def _unknown_setting(exc: BaseException) -> str | None:
    """The keyword a class was built with but does not take (a config key of another choice), else None."""
    m = re.search(r"got an unexpected keyword argument '(\w+)'", str(exc)) if isinstance(exc, TypeError) else None
    return m.group(1) if m else None


def is_user_error(exc: BaseException) -> bool:
    from hydra.errors import InstantiationException

    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        return _unknown_setting(exc.__cause__) is not None or is_user_error(exc.__cause__)
    return isinstance(exc, user_error_types())


# --- building from config --------------------------------------------------------------------------------------
def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Every node with a `_target_` in a config group that holds several objects (callbacks, loggers)."""
    import hydra

    if not cfg:
        return []
    return [hydra.utils.instantiate(node, _convert_="all") for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_loggers(cfg: DictConfig | None) -> list[Any]:
    """The config's loggers. Lightning's WandbLogger hands wandb.init `anonymous=None` whatever it is given, and
    wandb printed "The anonymous setting has no effect" on every run (and in a sweep's one-line-per-job output)."""
    loggers = instantiate_dict(cfg)
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
    return loggers


# --- summary.json ----------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2, default=_json_default).encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    from bgremover.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(data, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def history_lists(history: list[dict]) -> dict[str, list]:
    """[{epoch, val/mIoU, ...}, ...] → {epoch: [...], val/mIoU: [...]} for plotting."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    return {k: [row.get(k) for row in history] for k in keys}


def log_file() -> str | None:
    """The run's log file (Hydra's job logging), where tracebacks go instead of the terminal."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _log_to_files(text: str) -> None:
    record = logging.LogRecord("bgremover", logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


# Lightning's advertising and the warnings that say nothing a user of this project can act on.
_NOISE = (
    "💡 Tip", "litlogger", "litmodels", "does not have many workers", "The number of training batches",
    "Checkpoint directory", "is deprecated", "LeafSpec", "`weights_only` was not set",
    "to estimate number of stepping batches", "is not supported by the model summary",
    "WeightAveraging doesn't support sharding",  # callbacks=ema: configure_model shards nothing here
    # a resume from the Ctrl-C / SIGTERM checkpoint (mid-epoch, as the resume hint says): the train loaders go on
    # with the frames that epoch had left (datamodule.ShuffleState, the resident loader); the plan says where
    "resuming from a checkpoint that ended before the epoch ended",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def quiet_libraries(verbose: bool = True) -> None:
    """Silence Lightning's tips and known deprecation noise; with verbose=False (sweep jobs) also its info lines
    (GPU available, model summary), so a sweep prints one line per job. Everything still reaches the log file."""
    import warnings

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    # Filters on the handlers, not levels on the loggers: a logger's own filter does not see what its children
    # pass up, importing Lightning resets its logger to INFO (and costs seconds this early), and a level would
    # keep the lines out of the run's log file too.
    drop = _DropNoise()
    for handler in logging.getLogger().handlers:
        handler.addFilter(drop)
        if not verbose and not isinstance(handler, logging.FileHandler):  # the terminal only
            handler.addFilter(_QuietInfo())
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" on first use


class _QuietInfo(logging.Filter):
    """Below WARNING, nothing from Lightning or bgremover on the terminal of a sweep job (its log file keeps all),
    nor a warning its job line carries (`extra=IN_JOB_LINE`: the PARTIAL test and val numbers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "in_job_line", False):
            return False
        return record.levelno >= logging.WARNING or not record.name.startswith(
            ("pytorch_lightning", "lightning_fabric", "lightning", "bgremover"))


IN_JOB_LINE = {"in_job_line": True}  # `log.warning(..., extra=IN_JOB_LINE)`: a sweep job's one line says it


def test_split_info(metrics: dict[str, float], datamodule, split: str = "test") -> dict[str, Any]:
    """How many frames of `split` the numbers cover, of how many the split has: partial runs say so."""
    frames = metrics.get(f"{split}/frames")
    if frames is None:  # no test ran (test=false): the split need not exist, e.g. a train+val copy on a GPU machine
        return {"frames": None, "of": None, "complete": None}
    total = datamodule.split_size(split) if hasattr(datamodule, "split_size") else None  # every datamodule here has it
    frames = int(frames)
    return {"frames": frames, "of": total, "complete": None if total is None else frames == total}


def frames_note(split: dict | None) -> str:
    """` (233 frames)`, or ` (4 of 233 frames, PARTIAL)`: a partial test set is not the split's score, and is
    flagged wherever its number is shown ("(4 frames)" looked whole); "" when unknown."""
    split = split or {}
    frames, of = split.get("frames"), split.get("of")
    if not frames:
        return ""
    return f" ({frames} of {of} frames, PARTIAL)" if split.get("complete") is False else \
        f" ({count(frames, 'frame')})"


def val_note(split: dict | None) -> str:
    """`, best epoch by val (4 of 101 frames, PARTIAL)` where the val numbers that picked the tested epoch cover
    part of the split (or a validation cut short picked it); "" otherwise."""
    split = split or {}
    if split.get("complete") is not False:
        return ""
    return ", best epoch by val" + (frames_note(split) if split.get("frames") and split["frames"] < split.get("of", 0)
                                    else " (a validation cut short, PARTIAL)")


def print_error(exc: BaseException) -> None:
    """One line on stderr; for an unexpected error, where its traceback was logged."""
    where = None if isinstance(exc, user_error_types()) else log_file()
    from bgremover.errors import report

    report(error_summary(exc) + (f" (traceback in {where})" if where else ""))
