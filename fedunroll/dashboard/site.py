"""``fedunroll dashboard --site SITE_DIR --checkpoint MODEL.pt``: one hospital's own view.

Runs on the site's machine: the model of a checkpoint reconstructs the site's test slices and
each slice is shown as a PNG drawn here with matplotlib (zero-filled, model, reference and the
two |error| maps). Images exist only in this process and the browser on this machine; the
server's dashboard shows scalars only.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from fedunroll.dashboard import render

PAGE_SLICES = 12
CACHE_SLICES = 32


class SiteViewer:
    """The test slices of ``site_dir`` through the model of ``checkpoint`` (lazily, cached)."""

    def __init__(
        self,
        site_dir: str | os.PathLike[str],
        checkpoint: str | os.PathLike[str],
        device: str = "cpu",
    ) -> None:
        from recon.data.dataset import SiteDataset
        from recon.models.checkpoint import load_checkpoint

        self.site_dir = Path(site_dir).expanduser().resolve()
        self.checkpoint = Path(checkpoint).expanduser().resolve()
        self.device = device
        self.model, _, ckpt = load_checkpoint(self.checkpoint, device)
        self.model.eval()
        run_config = ckpt.get("run_config")
        kwargs: dict[str, Any] = {}
        self.note = ""
        if isinstance(run_config, dict):
            from fedunroll.report import data_kwargs_from_config

            kwargs = data_kwargs_from_config(run_config)  # the masks and crop of the run
        else:
            self.note = "The checkpoint holds no run config: default masks and no crop."
        self.dataset = SiteDataset(self.site_dir, split="test", **kwargs)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.dataset)

    def slice(self, index: int) -> dict[str, Any]:
        """Images (numpy) and metrics of test slice ``index``."""
        import torch

        from recon.data.sample import collate
        from recon.metrics import all_metrics
        from recon.train import zero_filled

        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            item = self.dataset[index]
            sample = collate([item]).to(self.device)
            physics = sample.physics()
            with torch.no_grad():
                zf = zero_filled(sample)
                out = physics.rss(self.model(sample.kspace, physics))
            ref = sample.target
            got = {
                "index": index,
                "label": f"{item.meta.get('file', '')}:{item.meta.get('slice', '')}",
                "images": {
                    "zero_filled": zf[0].cpu().numpy(),
                    "model": out[0].cpu().numpy(),
                    "reference": ref[0].cpu().numpy(),
                    "err_zf": (zf - ref).abs()[0].cpu().numpy(),
                    "err_model": (out - ref).abs()[0].cpu().numpy(),
                },
                "zero_filled": all_metrics(zf, ref),
                "model": all_metrics(out, ref),
            }
            self._cache[index] = got
            while len(self._cache) > CACHE_SLICES:
                self._cache.popitem(last=False)
            return got

    def png(self, index: int) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        got = self.slice(index)
        im = got["images"]
        vmax = float(im["reference"].max()) or 1.0
        emax = float(max(im["err_zf"].max(), im["err_model"].max())) or 1.0
        panels = [
            ("zero-filled", im["zero_filled"], "gray", vmax, got["zero_filled"]),
            ("model", im["model"], "gray", vmax, got["model"]),
            ("reference", im["reference"], "gray", vmax, None),
            ("|error| zero-filled", im["err_zf"], "inferno", emax, None),
            ("|error| model", im["err_model"], "inferno", emax, None),
        ]
        fig = Figure(figsize=(2.3 * len(panels), 2.6))
        axes = fig.subplots(1, len(panels))
        for ax, (title, img, cmap, top, m) in zip(axes, panels, strict=True):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
            if m is not None:
                ax.set_xlabel(f"SSIM {m['ssim']:.3f} · PSNR {m['psnr']:.1f}", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    # --- routes -----------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        def index(request: Request) -> Response:
            try:
                page = max(0, int(request.query_params.get("page", "0")))
            except ValueError:
                page = 0
            first = page * PAGE_SLICES
            items = [self.slice(i) for i in range(first, min(len(self), first + PAGE_SLICES))]
            note = self.note
            if len(self) > PAGE_SLICES:
                note += f" Slices {first}-{first + len(items) - 1} of {len(self)} (?page=N)."
            html = render.site_page(self.site_dir.name, self.checkpoint.name, items, note)
            return HTMLResponse(html)

        def png(request: Request) -> Response:
            i = request.path_params["index"]
            if not 0 <= i < len(self):
                return PlainTextResponse("no such slice", status_code=404)
            return Response(self.png(i), media_type="image/png")

        return [Route("/", index), Route("/site/slice/{index:int}.png", png)]


__all__ = ["SiteViewer"]
