"""A toy role config with every supported setting type, shared by the loader tests."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hypha.config import REQUIRED, InvalidSetting, section, setting


@dataclass(frozen=True)
class Alpha:
    """Every supported type, each with a default."""

    name: str = setting("hypha", "a string", flag="--name")
    count: int = setting(3, "an integer")
    ratio: float = setting(0.5, "a number")
    on: bool = setting(False, "a boolean")
    home: Path = setting(Path("/srv/hypha"), "a path")
    tags: list[str] = setting(["a", "b"], "some strings")
    files: list[Path] = setting([], "some paths")
    note: str | None = setting(None, "an optional string")
    limit: int | None = setting(7, "an optional integer")
    where: Path | None = setting(None, "an optional path")
    mode: str = setting("fast", "a choice", choices=("fast", "slow"))


@dataclass(frozen=True)
class Beta:
    """Required settings and a validation hook."""

    secret: Path = setting(REQUIRED, "a required path", example="secret.pem")
    port: int = setting(REQUIRED, "a required integer", example=4001)

    def validate(self) -> None:
        if self.port == 13:
            raise ValueError("port 13 is unlucky")
        if self.port <= 0:
            raise InvalidSetting("port", f"must be positive, got {self.port}")


@dataclass(frozen=True)
class Toy:
    """A toy role for the tests."""

    role: ClassVar[str] = "toy"

    alpha: Alpha = section(Alpha)
    beta: Beta = section(Beta)


#: Enough to satisfy [beta], so that a test can look at [alpha] alone.
BETA = {"beta.secret": "/etc/secret", "beta.port": 1}


def defaults() -> Toy:
    return Toy(alpha=Alpha(), beta=Beta(secret=Path("/etc/secret"), port=1))
