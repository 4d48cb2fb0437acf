"""Model card templates (Jinja, rendered with `huggingface_hub.ModelCard.from_template`), installed as
`hf_prune.model_cards`. Load them with :func:`template`."""

from __future__ import annotations

from importlib.resources import files

__all__ = ["DEFAULT_TEMPLATE", "template"]

DEFAULT_TEMPLATE = "pruned_model.md"


def template(name: str = DEFAULT_TEMPLATE) -> str:
    """The text of the template `name` shipped in this package."""
    path = files(__name__).joinpath(name)
    if not path.is_file():
        available = sorted(p.name for p in files(__name__).iterdir() if p.name.endswith(".md"))
        raise FileNotFoundError(f"no model card template {name!r}; available: {available}")
    return path.read_text(encoding="utf-8")
