"""Registering SEAL with PEFT.

PEFT (>= 0.15) has ``register_peft_method`` for third-party methods, but it only accepts names that
already exist in its closed ``PeftType`` enum. The one hack of this package is therefore adding a
``SEAL`` member to that enum (``add_enum_member``); everything else goes through PEFT's public
registration function. Both steps are idempotent, so importing ``seal_peft`` any number of times (or
from several places) is safe.

This module imports nothing from seal_peft: ``config.py`` needs only the enum member
(:func:`seal_peft_type`), and the package ``__init__`` passes the config and tuner classes to
:func:`register`, so there is no import cycle between the config, the tuner and the registration.
"""

from __future__ import annotations

import enum
import threading

_LOCK = threading.Lock()
_DONE = False

NAME = "SEAL"


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add member ``name = value`` to an existing ``(str, Enum)`` class; return the member.

    Idempotent: an existing member of that name is returned unchanged. Works on Python 3.10-3.13:
    the member is created the way ``EnumType`` creates them for ``str`` mixins, then entered into
    the three lookup tables (``_member_map_`` for ``E[name]``, ``_value2member_map_`` for
    ``E(value)``, ``_member_names_`` for iteration/``len``) and set as a class attribute for
    ``E.NAME``. ``type.__setattr__`` bypasses ``EnumType.__setattr__``, which forbids new members.
    """
    existing = enum_cls._member_map_.get(name)
    if existing is not None:
        if existing.value != value:
            raise RuntimeError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}")
        return existing
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def seal_peft_type() -> enum.Enum:
    """``PeftType.SEAL``, added to PEFT's enum on first use (idempotent, thread-safe)."""
    from peft.utils import PeftType

    with _LOCK:
        return add_enum_member(PeftType, NAME, NAME)


def register(config_cls: type, model_cls: type) -> None:
    """Make ``PeftType.SEAL`` and SEAL's config/tuner classes known to PEFT (safe to call repeatedly).

    Called by ``seal_peft/__init__.py`` (every ``import seal_peft...`` runs it); use
    ``seal_peft.ensure_registered()`` to call it again.
    """
    global _DONE
    if _DONE:
        return
    peft_type = seal_peft_type()
    with _LOCK:
        if _DONE:
            return
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import register_peft_method

        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            register_peft_method(name=NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix="seal_")
        _DONE = True
