"""The keys of a composed config checked against what reads them: a `_target_` node's settings against the class it
names (`check_settings`: names and numbers), and keys the command line adds with `+` that are typos of keys the
config has (`check_added_keys`). The other checks of a config are `checks.py`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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


def check_built_nodes(cfg: DictConfig) -> None:
    """A node of `callbacks` or `logger` is built only when it has a `_target_` (utils.instantiate_dict skips the
    rest, as lightning-hydra-template does): `+callbacks.early_stoping.patience=3`, a typo that adds a node, was
    skipped without a word and the run stopped early by the recipe's patience. Only a node the command line writes
    into: a recipe's setting of a callback that `callbacks=none` (the README's choice) drops, as cpu_default's
    early_stopping patience, is skipped as the template skips it (refusing it refused every recipe's callbacks=none)."""
    typed = [o.lstrip("+").split("=", 1)[0] for o in overrides()]
    for group in ("callbacks", "logger"):
        nodes = cfg.get(group)
        for name in nodes if isinstance(nodes, DictConfig) else ():
            if isinstance(node := nodes.get(name), DictConfig) and "_target_" not in node \
                    and any(k == f"{group}.{name}" or k.startswith(f"{group}.{name}.") for k in typed):
                near = close_key(str(name), [str(k) for k in nodes if k != name])
                raise UserError(f"{group}.{name} has no _target_, so nothing builds it"
                                + (f". Did you mean '{group}.{near}'?" if near else ""))


def check_added_keys(cfg: DictConfig, settings: bool = False) -> None:
    """`+remover_budget=600`, typed as Hydra's advice for the misspelt key says: the new top-level key was read by
    nothing and the run trained the recipe's 30 minutes without a word. A key added with `+` (new by Hydra's rule),
    or with `++` where the config has no such key, that is a typo of one the config has is refused as Hydra's own
    typo answer is (config._hydra_message); so is a key added under a `_target_` node that is a typo of an argument
    its target takes (`+trainer.max_epoch=3`, `+model.net.encoder_dpth=4`: smp takes any keyword and ignored it).
    Others (`+trainer.profiler=simple`, `++train=false`, a key of the user's own) are added on purpose and kept.
    Top-level keys, or with `settings` the keys under a `_target_` node: that check imports the class (Lightning's
    Trainer: seconds on 2 cores), so the config checks run it after the cheap ones have said their line."""
    for override in overrides():
        key, _, value = override.partition("=")
        if not key.startswith("+"):
            continue
        key = key.lstrip("+")
        parent, _, name = key.rpartition(".")
        if parent or settings:
            if parent and settings:
                _check_added_setting(cfg, override, parent, name, value)
            elif parent and not override.startswith("++"):
                _check_added_plain_key(cfg, override, parent, name, value)
            continue
        if not key.isidentifier() or (Path(CONFIG_DIR) / key).is_dir():  # a config group
            continue
        # ++ sets a key whether or not it is there: a key the config has (`++train=false`, near `trainer`) is kept
        if (near := close_key(key, cfg.keys())) and (not override.startswith("++") or not _in_config_without(override, key)):
            raise UserError(f"{override} adds a key nothing reads. Did you mean '{near}'? (give it as {near}={value})")


def _check_added_plain_key(cfg: DictConfig, override: str, parent: str, name: str, value: str) -> None:
    """`+extras.print_confg=false`, `+paths.log_dri=x`: under a node built by no class (the `_target_` ones are
    `_check_added_setting`'s), a new key that is a typo of one beside it is read by nothing. The groups of objects
    (callbacks, logger), where a new entry beside the others is the point, and Hydra's own node are left alone."""
    if parent.split(".")[0] in ("hydra", "callbacks", "logger"):
        return
    node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False)
    if isinstance(node, DictConfig) and "_target_" not in node and (near := close_key(name, node.keys())):
        raise UserError(f"{override} adds a key nothing reads. Did you mean '{parent}.{near}'? "
                        f"(give it as {parent}.{near}={value})")


def _check_added_setting(cfg: DictConfig, override: str, parent: str, name: str, value: str) -> None:
    """`+a.b=value` under a node with a `_target_`: refused when `b` is a typo of an argument the target takes."""
    import inspect

    from hydra.utils import get_object

    node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False) \
        if parent.split(".")[0] != "hydra" else None
    if not isinstance(node, DictConfig) or "_target_" not in node or name.startswith("_"):
        return
    try:
        target = get_object(node._target_)
        # a class's arguments, and its parents' where its **kwargs passes them on (data=camvid_resident's
        # ResidentCamVidDataModule takes CamVidDataModule's)
        calls = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
        takes: list[str] = []
        for call in calls:
            params = inspect.signature(call).parameters.values()
            takes += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
    except Exception:  # a target not importable here: Hydra's own error names it when it is built
        return
    if name not in takes and (near := close_key(name, set(takes) - {"self"})):
        # a key the node lacks is added with `+` (plain `parent.near=` was Hydra's "Could not override")
        given_as = f"{'' if near in node else '+'}{parent}.{near}"
        raise UserError(f"{override} adds a setting {node._target_} does not take. Did you mean '{parent}.{near}'? "
                        f"(give it as {given_as}={value})")


def _in_config_without(override: str, key: str) -> bool:
    """Whether `key` is in the config this command composes without `override` (a `++key=`): Hydra's composition
    (in the Hydra the command runs in, else over CONFIG_DIR); False where it cannot be composed again."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().job.config_name if HydraConfig.initialized() else None
    if not name:
        return False
    ours = contextlib.nullcontext() if GlobalHydra.instance().is_initialized() else \
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3")
    try:
        with ours:
            config = compose(name, overrides=[o for o in overrides() if o != override])
    except Exception:  # noqa: BLE001 — what the command composed once; a failure here says nothing of the key
        return False
    return key in config
