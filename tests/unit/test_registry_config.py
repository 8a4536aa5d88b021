from dataclasses import dataclass

import pytest

from lmedit.config import load_config, to_dict
from lmedit.editors.rome import RomeConfig
from lmedit.registry import Registry, editors


def test_registry_did_you_mean():
    reg: Registry[int] = Registry("thing")
    reg.register("rome")(1)
    with pytest.raises(KeyError, match="Did you mean 'rome'"):
        reg.get("rom")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("rome")(2)
    assert "rome" in editors.names()


@dataclass(frozen=True, kw_only=True)
class Cfg:
    lr: float = 0.5
    layers: tuple[int, ...] = (1,)
    name: str | None = None
    flag: bool = False


def test_load_config_converts_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-1\nlayers: [3, 4]\n")
    cfg = load_config(Cfg, path, ["flag=true", "name=x"])
    assert cfg == Cfg(lr=0.5, layers=(3, 4), name="x", flag=True)
    assert isinstance(cfg.lr, float)
    with pytest.raises(ValueError, match="Did you mean 'layers'"):
        load_config(Cfg, None, ["layer=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(Cfg, None, ["lr"])


def test_rome_config_round_trips_and_validates(tmp_path):
    import yaml

    cfg = RomeConfig(layer=4, v_lr=0.3)
    path = tmp_path / "rome.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(RomeConfig, path) == cfg
    with pytest.raises(ValueError, match="layer"):
        RomeConfig(layer=-1)
    with pytest.raises(ValueError, match="source"):
        RomeConfig(corpus="wikipedia")
