"""The keys of a composed config checked against what reads them: a `_target_` node's settings against the class it
names (`check_settings`: names and numbers), and keys the command line adds with `+` that are typos of keys the
config has (`check_added_keys`). The other checks of a config are `checks.py`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from omegaconf import DictConfig

from bgremover.config import CONFIG_DIR, close_key, given, overrides
from bgremover.errors import UserError


def as_number(value):
    """A number, or a string holding one (`seed=${oc.env:SLURM_ARRAY_TASK_ID}` resolves to text) as int or float;
    anything else unchanged."""
    if isinstance(value, str):
        for kind in (int, float):
            with contextlib.suppress(ValueError):
                return kind(value.strip())
    return value


def check_settings(key: str, node, names: bool = True) -> None:
    """Every setting of a `_partial_` node (the optimizer, the scheduler) is an argument its class takes (with
    `names`), and a setting its class types as a number is one: `callbacks.early_stopping.patience=abc` trained,
    then stopped at the first epoch without improvement on "'>=' not supported between 'int' and 'str'"."""
    if not isinstance(node, DictConfig) or not node.get("_target_"):
        return
    import inspect
    import types
    import typing

    from hydra.utils import get_class

    try:
        cls = get_class(node._target_)
        params = inspect.signature(cls).parameters
    except Exception:  # an unknown class: Hydra's own error names it when it is built
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # a hint naming a type only imported for type checkers: those that are types
        hints = {n: p.annotation for n, p in params.items()}
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # torch's lr: float | Tensor (no config gives one)
    for k in node:
        hint = hints.get(k)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = set(typing.get_args(hint) if union else [hint]) - {type(None), tensor}
        value, optional = node.get(k), union and type(None) in typing.get_args(hint)
        # A list or a null where the class takes none failed after the build (`model.optimizer.weight_decay=[1]`:
        # "'<=' not supported between 'float' and 'list'"; `model.scheduler.power=null` at the first step).
        # total_iters: null is the run's length (SegmentationModule fills it in)
        if kinds and kinds <= {int, float} and (
                not isinstance(as_number(value), int | float) if value is not None else not optional and k != "total_iters"):
            raise UserError(f"{key}.{k} must be a number, got {'null' if value is None else repr(value)}")
        if kinds and kinds <= {int, float} and isinstance(value, str):
            # a number as text (`'model.optimizer.lr="1e-3"'`, what ${oc.env:...} gives) is that number, as the
            # seed and time budgets take it and as OmegaConf's typed nodes convert it: passed on as text, torch's
            # optimizer failed at fit time on "'<=' not supported between 'float' and 'str'"
            node[k] = as_number(value)
        if kinds == {bool} and not isinstance(value, int) and (value is not None or not optional):  # fused=maybe: on
            raise UserError(f"{key}.{k} must be true or false, got {'null' if value is None else repr(value)}")
    if not names or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in node if not str(k).startswith("_") and k not in params]
    if unknown:
        takes = ", ".join(n for n, p in params.items() if n not in ("self", "params", "optimizer")
                          and p.kind is not inspect.Parameter.VAR_POSITIONAL)
        # not typed on the command line: the recipe set it for the class it names, which an override of _target_
        # replaced (`model.optimizer._target_=torch.optim.AdamW` on the paper recipe's RMSprop alpha)
        drop = "" if given(f"{key}.{unknown[0]}") else \
            f"; the recipe sets it for the class it names: drop it with ~{key}.{unknown[0]}"
        raise UserError(f"{key}.{unknown[0]} is not a setting of {node._target_} (it takes: {takes}){drop}")


def check_added_keys(cfg: DictConfig) -> None:
    """`+remover_budget=600`, typed as Hydra's advice for the misspelt key says: the new top-level key was read by
    nothing and the run trained the recipe's 30 minutes without a word. A key added with `+` (new by Hydra's rule)
    that is a typo of one the config has is refused as Hydra's own typo answer is (config._hydra_message); others
    (`+trainer.profiler=simple`, a key of the user's own) are added on purpose and kept."""
    for override in overrides():
        key, _, value = override.partition("=")
        if not key.startswith("+") or key.startswith("++"):  # ++ sets a key whether or not it is there
            continue
        key = key[1:]
        if not key.isidentifier() or (Path(CONFIG_DIR) / key).is_dir():  # a nested key or a config group
            continue
        if near := close_key(key, cfg.keys()):
            raise UserError(f"{override} adds a key nothing reads. Did you mean '{near}'? (give it as {near}={value})")
