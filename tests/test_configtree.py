"""The domain-free loader on a tree that is not this project's: layers, overrides, one error for all."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from components.core.configtree import load_tree, option, reference, to_yaml
from components.core.errors import ConfigError


@dataclass(frozen=True)
class Engine:
    """An engine."""

    cylinders: int = option(4, help="how many cylinders")
    fuel: str = option("petrol", help="what it burns")


@dataclass(frozen=True)
class Car:
    """A car."""

    name: str = option("car", help="what it is called")
    top_speed: float | None = option(None, help="km/h, when known")
    tags: list[str] = option(help="labels", factory=list)
    engine: Engine = option(help="what moves it", factory=Engine)


def test_layers_then_overrides_with_coercion(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nengine: {cylinders: 6}\n")
    (tmp_path / "car.yaml").write_text("extends: base.yaml\nengine: {fuel: diesel}\ntop_speed: 180\n")
    car = load_tree(Car, str(tmp_path / "car.yaml"), ["engine.cylinders=8", "tags=[a, b]"])
    assert car == Car(
        name="base", top_speed=180.0, tags=["a", "b"], engine=Engine(cylinders=8, fuel="diesel")
    )
    assert load_tree(Car, None, []) == Car()
    assert (
        load_tree(Car, None, [f"{k}={v}" for k, v in (("name", "x"), ("top_speed", "~"))]).top_speed is None
    )
    assert "cylinders: 4" in to_yaml(Car())


def test_every_problem_is_reported_at_once_with_the_nearest_key():
    with pytest.raises(ConfigError) as error:
        load_tree(Car, None, ["engine.cylindres=8", "nmae=x", "oops"])
    text = str(error.value)
    assert text.startswith("invalid configuration:")
    assert "unknown key 'engine.cylindres'; did you mean 'cylinders'?" in text
    assert "unknown key 'nmae'; did you mean 'name'?" in text
    assert "--set: expected key=value, got 'oops'" in text
    with pytest.raises(ConfigError) as error:
        load_tree(Car, None, ["engine.cylinders=many", "tags=a", "top_speed=fast"])
    text = str(error.value)
    for part in ("engine.cylinders: expected int", "tags: expected a list", "top_speed: expected float"):
        assert part in text


def test_reference_lists_every_leaf_with_type_default_and_help():
    text = reference(Car, title="Cars", intro="All of it.")
    assert "| `top_speed` | `float \\| None` | `null` | km/h, when known |" in text
    assert "## `engine`" in text and "| `engine.fuel` | `str` | `petrol` | what it burns |" in text


def test_a_field_without_help_is_refused():
    @dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(ValueError, match="Bare.x has no help"):
        reference(Bare, title="t", intro="i")
