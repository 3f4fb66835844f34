"""``[viz]``: how plots and pages are drawn. Import-light (no matplotlib)."""

from __future__ import annotations

from dataclasses import dataclass

from xsae_cli.core.settings import Settings, register_section, setting

FORMATS = ("png", "svg", "html")
METHODS = ("pca", "tsne", "umap")


@dataclass(frozen=True)
class VizSettings(Settings):
    """Static plot format and resolution, the cluster projection, dashboard paging."""

    format: str = setting("png", "Static plots: png or svg (html for an interactive cluster plot).", choices=FORMATS)
    dpi: int = setting(150, "Resolution of raster plots.", ge=10, le=2400)
    method: str = setting("pca", "Cluster projection: pca, tsne or umap (umap needs pip install umap-learn).", choices=METHODS)
    page_size: int = setting(50, "Latent cards the features dashboard renders at a time.", ge=1)
    max_image_mb: float = setting(8.0, "Report: pictures from run folders larger than this are listed, not embedded.", gt=0)


register_section("viz", VizSettings)
