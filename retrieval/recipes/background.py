"""The background set of ``retrieval run``: unrelated images whose scores against each query tell
what an unrelated image scores (score normalisation, estimated false-match rates).

``--background URL`` is either a folder / manifest of images (extracted with the run's model) or a
complete gallery-role feature output of the same model. Without it, the run uses the images this
package ships in ``retrieval/assets/background/`` (see its README: where they come from; none from a
reserved evaluation source).
"""
from __future__ import annotations

import os

from retrieval import outputs

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "background")


def shipped_background() -> str:
    """The folder of background images the package ships."""
    if not os.path.isdir(SHIPPED) or not any(f.endswith(".jpg") for f in os.listdir(SHIPPED)):
        raise FileNotFoundError(f"the shipped background images are missing ({SHIPPED}): reinstall the "
                                "package, or pass --background URL")
    return SHIPPED


def resolve_background(background: str | None) -> tuple[str | None, str | None]:
    """``(feature_output_url, None)`` for a feature output, ``(None, images_url)`` for images."""
    if background is None:
        return None, shipped_background()
    manifest = outputs.find(background, "extract")
    if manifest is not None:
        if manifest.get("role") != "gallery":
            raise ValueError(f"--background {background}: a {manifest.get('role')}-role feature output; "
                             "the background must be gallery-role features or images")
        return background, None
    return None, background
