"""The README documents every setting (it is the configuration reference)."""

from __future__ import annotations

from pydantic import BaseModel

from gateway.settings import REPO_ROOT, Settings


def env_names(model: type[BaseModel], prefix: str = "PALM_") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name for name in env_names(Settings) if f"`{name}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
