"""``fedunroll report RUN_DIR``: tables and figures from a run's ``results.json``.

Writes into ``RUN_DIR``:

* ``report.md``: per site x method final metrics (federated, zero-filled, local-only,
  centralized when present) with SSIM / NRMSE / PSNR, the before/after personalization table
  per site (seen and unseen) when the run personalized, a per-round aggregate table and any
  rejected replies;
* ``metrics_vs_round.png``: validation SSIM / NRMSE / PSNR per site against the round;
* ``site_bars.png``: final metrics per site, one bar per method;
* ``recon_grid.png``: per site one test slice (zero-filled, federated, reference, |error| maps),
  when the run's data and ``final_model.pt`` are at hand.

A failed or unfinished run is reported with whatever rounds it has. ``results.json`` is validated
first; a malformed file raises :class:`ResultsError` naming the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recon.fileio import atomic_write_text
from server.results import FINAL_METHODS as METHODS
from server.results import METRIC_KEYS as METRICS
from server.results import ResultsError, validate_results

if TYPE_CHECKING:
    from recon.config import RunConfig  # imports torch: only where a config is parsed

LABELS = {
    "federated": "federated",
    "zero_filled": "zero-filled",
    "local_only": "local-only",
    "centralized": "centralized",
    "federated_val": "federated (val, last round)",
}
HEADERS = {"ssim": "SSIM", "nrmse": "NRMSE", "psnr": "PSNR (dB)"}
FIGURES = ("metrics_vs_round.png", "site_bars.png", "recon_grid.png")
# Flat run-config keys that locate and prepare the data (owned by recon.config).
DATA_ROOT_KEY = "data.root"


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``RUN_DIR/results.json`` (or a ``results.json`` path)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is this a fedunroll run directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(str(path), "<file>", f"not valid JSON ({err})") from err
    return validate_results(data, str(path))


# ----------------------------------------------------------------------------- tables


def _num(value: Any) -> float:
    """A metric as a float; ``null`` (how ``results.json`` stores NaN) becomes NaN."""
    return math.nan if value is None else float(value)


def _fmt(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def _mean(values: Sequence[Any]) -> float | None:
    """Mean of the finite values (``None`` if there are none)."""
    finite = [v for v in map(_num, values) if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _weighted(rows: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """Example-weighted mean of ``key`` over sites with a finite value (plain mean if no
    examples are counted); ``None`` if no site has one."""
    pairs = [(float(m.get("num-examples", 0)), _num(m[key])) for m in rows.values()]
    pairs = [(w, v) for w, v in pairs if math.isfinite(v)]
    total = sum(w for w, _ in pairs)
    if total <= 0:
        return _mean([v for _, v in pairs])
    return sum(w * v for w, v in pairs) / total


def final_methods(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {site: metrics}}`` in report order.

    Without a final federated evaluation (a failed or unfinished run), the last round's
    validation metrics stand in, labelled ``federated_val``.
    """
    final = results.get("final") or {}
    out = {m: final[m] for m in METHODS if final.get(m)}
    if "federated" not in out:
        evaluated = [r for r in results["rounds"] if r["eval"]]
        if evaluated:
            out = {"federated_val": evaluated[-1]["eval"], **out}
    return out


def all_sites(results: Mapping[str, Any]) -> list[str]:
    """The run's site ids, then any other site that appears in metrics, in order of appearance."""
    sites = list(results["sites"])
    seen = set(sites)
    for per_site in final_methods(results).values():
        for s in per_site:
            if s not in seen:
                sites.append(s)
                seen.add(s)
    for r in results["rounds"]:
        for s in [*r["eval"], *r["train"]]:
            if s not in seen:
                sites.append(s)
                seen.add(s)
    return sites


def site_table(results: Mapping[str, Any]) -> str:
    """Markdown table: one row per site x method, then the mean over sites per method."""
    methods = final_methods(results)
    if not methods:
        return "_No per-site metrics in this run._"
    head = "| site | method | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(METRICS)]
    sites = [s for s in all_sites(results) if any(s in v for v in methods.values())]
    for site in sites:
        for method, per_site in methods.items():
            if site in per_site:
                vals = " | ".join(_fmt(k, _num(per_site[site][k])) for k in METRICS)
                lines.append(f"| {site} | {LABELS[method]} | {vals} |")
    if len(sites) > 1:
        for method, per_site in methods.items():
            vals = " | ".join(_fmt(k, _mean([m[k] for m in per_site.values()])) for k in METRICS)
            lines.append(f"| **mean** | {LABELS[method]} | {vals} |")
    return "\n".join(lines)


def distribution_table(results: Mapping[str, Any]) -> str | None:
    """The final metrics' distribution over the evaluated sites (``final_summary``: mean,
    quartiles, worst site), with how many of the federation's sites were evaluated."""
    summary = results.get("final_summary")
    if not summary:
        return None
    lines = ["| metric | mean | q1 | median | q3 | worst | worst site |", "|---|" + "---:|" * 6]
    for metric in ("ssim", "nrmse", "psnr"):
        d = summary.get(metric)
        if d:
            vals = [_fmt(metric, d[k]) for k in ("mean", "q1", "median", "q3", "worst")]
            lines.append(f"| {metric} | {' | '.join(vals)} | {d['worst_site']} |")
    total = summary.get("num_sites")
    of = f" of {total}" if total else ""
    return f"{summary['evaluated']}{of} sites evaluated (final-eval-sites).\n\n" + "\n".join(lines)


def _delta(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.4f}"


def personalization_table(results: Mapping[str, Any]) -> str | None:
    """Markdown table: per site (seen, then unseen) test metrics before and after
    personalization and what the site decided; ``None`` when the run did not personalize."""
    per_site = results.get("personalization") or {}
    if not per_site:
        return None
    cols = ["site", "seen"]
    for m in METRICS:
        cols += [f"{HEADERS[m]} before", f"{HEADERS[m]} after"]
    cols += ["ΔSSIM", "decision"]
    rule = "|---|---|" + "---:|" * (2 * len(METRICS) + 1) + "---|"
    lines = ["| " + " | ".join(cols) + " |", rule]
    order = sorted(per_site, key=lambda s: (not per_site[s]["seen"], s))
    groups: dict[bool, list[Mapping[str, Any]]] = {True: [], False: []}
    for site in order:
        e = per_site[site]
        seen = "seen" if e["seen"] else "unseen"
        if "error" in e:
            blank = " | ".join(["–"] * (2 * len(METRICS) + 1))
            reason = str(e["error"]).replace("|", "/").splitlines()[0]
            lines.append(f"| {site} | {seen} | {blank} | failed: {reason} |")
            continue
        groups[bool(e["seen"])].append(e)
        vals = []
        for m in METRICS:
            vals += [_fmt(m, _num(e["before"][m])), _fmt(m, _num(e["after"][m]))]
        delta = _num(e["after"]["ssim"]) - _num(e["before"]["ssim"])
        decision = str(e.get("decision") or ("fine-tuned" if e["fine_tune"] else "kept global"))
        lines.append(f"| {site} | {seen} | {' | '.join(vals)} | {_delta(delta)} | {decision} |")
    for is_seen, entries in groups.items():
        if len(entries) > 1:
            vals = []
            for m in METRICS:
                vals += [
                    _fmt(m, _mean([e["before"][m] for e in entries])),
                    _fmt(m, _mean([e["after"][m] for e in entries])),
                ]
            mean_delta = _mean(
                [_num(e["after"]["ssim"]) - _num(e["before"]["ssim"]) for e in entries]
            )
            label = "seen" if is_seen else "unseen"
            lines.append(f"| **mean** | {label} | {' | '.join(vals)} | {_delta(mean_delta)} | |")
    return "\n".join(lines)


def rounds_table(results: Mapping[str, Any]) -> str:
    """Markdown table: per round, time, traffic, clients and example-weighted metrics."""
    rounds = results["rounds"]
    if not rounds:
        return "_No round completed._"
    cols = [
        "round",
        "seconds",
        "bytes sent",
        "bytes received",
        "clients",
        "rejected",
        "train loss",
        *(f"val {HEADERS[m]}" for m in METRICS),
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rounds:
        row = [
            str(r["round"]),
            f"{r['seconds']:.1f}",
            f"{r['bytes_sent']:,}",
            f"{r['bytes_received']:,}",
            str(len(r["train"])),
            str(len(r["rejected"])),
            _fmt("loss", _weighted(r["train"], "loss")),
            *(_fmt(m, _weighted(r["eval"], m)) for m in METRICS),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _rejected_table(results: Mapping[str, Any]) -> str | None:
    rows = [(r["round"], x["site"], x["reason"]) for r in results["rounds"] for x in r["rejected"]]
    if not rows:
        return None
    lines = ["| round | site | reason |", "|---:|---|---|"]
    lines += [f"| {n} | {s} | {reason.replace('|', '/')} |" for n, s, reason in rows]
    return "\n".join(lines)


def privacy_table(results: Mapping[str, Any]) -> str | None:
    """Epsilon per site and round (slice-level DP-SGD) and the site-level epsilon, with the
    run's delta and why it stopped early, if it did (README "Privacy")."""
    privacy = results.get("privacy")
    if not privacy:
        return None
    rounds = [r for r in results["rounds"] if "privacy" in r]
    sites = sorted({s for r in rounds for s in r["privacy"].get("epsilon", {})})
    site_level = any("site_level_epsilon" in r["privacy"] for r in rounds)
    head = ["round", *(f"eps {s}" for s in sites)] + (["eps site-level"] if site_level else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rounds:
        p = r["privacy"]
        cells = [str(r["round"]), *(_eps(p.get("epsilon", {}).get(s)) for s in sites)]
        if site_level:
            cells.append(_eps(p.get("site_level_epsilon")))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"delta = {privacy['delta']:g} per site, accountant {privacy['accountant']}"]
    slice_level = privacy.get("slice_level")
    if slice_level:
        notes.append(
            f"slice-level DP-SGD: clip {slice_level['clip']:g}, noise multiplier "
            f"{slice_level['noise_multiplier']:.4g}, {slice_level['sampling']}"
        )
    if privacy.get("site_level"):
        s = privacy["site_level"]
        notes.append(f"site-level: clip {s['clip']:g}, noise multiplier {s['noise_multiplier']:g}")
    if privacy.get("epsilon_budget"):
        notes.append(f"budget epsilon {privacy['epsilon_budget']:g}")
    if privacy.get("stopped"):
        notes.append(f"**stopped early**: {privacy['stopped']}")
    return "; ".join(notes) + ".\n\n" + "\n".join(lines)


def _eps(value: Any) -> str:
    return "inf" if value is None else f"{float(value):.3g}"


def _config_table(config: Mapping[str, Any]) -> str:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(config.items())]
    return "\n".join(lines)


def _summary_line(results: Mapping[str, Any]) -> str:
    parts = [f"status: **{results['status']}**", f"sites: {len(results['sites'])}"]
    n_rounds = len(results["rounds"])
    planned = results["config"].get("num-server-rounds")
    parts.append(f"rounds: {n_rounds}" + (f" of {planned}" if planned is not None else ""))
    model = results.get("model")
    if model:
        parts.append(
            f"model: {model['num_parameters']:,} parameters ({model['bytes'] / 2**20:.2f} MiB)"
        )
    timings = results.get("timings")
    if timings:
        total, in_rounds = timings["total_seconds"], timings["rounds_seconds"]
        parts.append(f"time: {total:.1f} s total, {in_rounds:.1f} s in rounds")
    return " · ".join(parts)


def render_markdown(results: Mapping[str, Any], figures: Sequence[str] = ()) -> str:
    """The full ``report.md`` text."""
    out = [
        f"# fedunroll run `{results['name']}`",
        "",
        _summary_line(results),
        "",
        "## Final metrics per site (test split)",
        "",
        "SSIM and PSNR: higher is better; NRMSE: lower is better. Metrics on RSS magnitude.",
        "",
        site_table(results),
        "",
    ]
    distribution = distribution_table(results)
    if distribution:
        out += ["## Distribution over sites (federated, test split)", "", distribution, ""]
    personalized = personalization_table(results)
    if personalized:
        out += [
            "## Personalization (test split, before -> after)",
            "",
            "Each site fine-tuned the final global model on its own training slices, with r_fine "
            "and N_fine chosen by cross-validation (or kept it when that found no gain); "
            "unseen sites took no part in training. The weights stayed at the sites.",
            "",
            personalized,
            "",
        ]
    out += [
        "## Rounds",
        "",
        "Aggregates are example-weighted means over the sites that replied; validation split.",
        "",
        rounds_table(results),
        "",
    ]
    rejected = _rejected_table(results)
    if rejected:
        out += ["## Rejected replies", "", rejected, ""]
    privacy = privacy_table(results)
    if privacy:
        out += ["## Differential privacy", "", privacy, ""]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{Path(f).stem}]({f})\n" for f in figures]
    out += ["## Run configuration", "", _config_table(results["config"]), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_vs_round(results: Mapping[str, Any], path: Path) -> Path | None:
    """Validation SSIM / NRMSE / PSNR per site against the round (None if no round evaluated)."""
    rounds = [r for r in results["rounds"] if r["eval"]]
    if not rounds:
        return None
    plt = _pyplot()
    sites = [s for s in all_sites(results) if any(s in r["eval"] for r in rounds)]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for site in sites:
            xs = [r["round"] for r in rounds if site in r["eval"]]
            ys = [_num(r["eval"][site][metric]) for r in rounds if site in r["eval"]]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=site)
        mean = [_num(_weighted(r["eval"], metric)) for r in rounds]
        ax.plot([r["round"] for r in rounds], mean, "k--", lw=1.5, label="weighted mean")
        zf = (results.get("final") or {}).get("zero_filled") or {}
        zf_mean = _mean([m[metric] for m in zf.values()])
        if zf_mean is not None:
            ax.axhline(
                zf_mean,
                color="grey",
                lw=1,
                ls=":",
                label="zero-filled (test, mean)",
            )
        ax.set_xlabel("round")
        ax.set_title(f"{HEADERS[metric]} (val)")
        ax.grid(alpha=0.3)
        if len(rounds) < 12:
            ax.set_xticks([r["round"] for r in rounds])
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{results['name']}: validation metrics per round", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_site_bars(results: Mapping[str, Any], path: Path) -> Path | None:
    """Final SSIM / NRMSE / PSNR per site, one bar per method (None if there are none)."""
    methods = final_methods(results)
    if not methods:
        return None
    plt = _pyplot()
    sites = [s for s in all_sites(results) if any(s in v for v in methods.values())]
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(
        1, len(METRICS), figsize=(max(4.2, 1.1 * len(sites) + 1.5) * len(METRICS), 3.6)
    )
    for ax, metric in zip(axes, METRICS):
        for j, (method, per_site) in enumerate(methods.items()):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i, s in enumerate(sites)]
            ys = [_num(per_site[s][metric]) if s in per_site else math.nan for s in sites]
            ax.bar(xs, ys, width=width * 0.95, label=LABELS[method])
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels(sites, rotation=30 if len(sites) > 6 else 0)
        ax.set_title(HEADERS[metric])
        ax.grid(axis="y", alpha=0.3)
        values = [_num(m[metric]) for v in methods.values() for m in v.values()]
        finite = [v for v in values if math.isfinite(v)]
        if metric != "nrmse" and finite:  # zoom in on the differences that matter
            lo, hi = min(finite), max(finite)
            pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
            ax.set_ylim(max(0.0, lo - 3 * pad), hi + pad)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{results['name']}: final metrics per site (test)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recorded_run_config(config: Mapping[str, Any]) -> RunConfig:
    """A run's recorded flat config (``results.json``, its events, a checkpoint) parsed by
    ``recon.config.parse_run_config``, keys of other versions dropped; raises its
    ``ConfigError`` for a bad value."""
    from recon.config import VALID_KEYS, parse_run_config

    known = {k: v for k, v in config.items() if k in VALID_KEYS}  # keys of older versions dropped
    return parse_run_config(known)


def data_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`~recon.data.dataset.SiteDataset` keyword arguments from the flat run config
    (the same slices, crop and masks the sites used: see ``client.site.load_split``; rotated
    by file attribute, as at the sites)."""
    return recorded_run_config(config).data.dataset_kwargs()


def _grid_inputs(
    results: Mapping[str, Any], run_dir: Path, data_root: str | os.PathLike[str] | None
) -> tuple[dict[str, Any] | None, str]:
    model_path = run_dir / "final_model.pt"
    if not model_path.is_file():
        return None, f"recon grid skipped: no {model_path.name} in {run_dir}"
    config = results["config"]
    root = data_root if data_root is not None else config.get(DATA_ROOT_KEY)
    if not root:
        return None, f"recon grid skipped: no data folder (pass --data DIR or set {DATA_ROOT_KEY})"
    root = Path(root)
    if not root.is_dir():
        return None, f"recon grid skipped: data folder {root} does not exist"
    site_dirs = {s: root / s for s in results["sites"] if (root / s).is_dir()}
    if not site_dirs:
        return (
            None,
            f"recon grid skipped: none of the sites {results['sites']} is a folder in {root}",
        )
    return {
        "model_path": model_path,
        "site_dirs": site_dirs,
        "data_kwargs": data_kwargs_from_config(config),
    }, ""


def _reconstruct(ctx: Mapping[str, Any], device: str) -> list[dict[str, Any]]:
    """One middle test slice per site through zero-filling and the federated model (numpy)."""
    import torch

    from recon.data.dataset import SiteDataset
    from recon.data.h5io import DataError
    from recon.data.sample import collate
    from recon.metrics import all_metrics
    from recon.models.checkpoint import load_checkpoint
    from recon.train import zero_filled

    model, _, _ = load_checkpoint(ctx["model_path"], device)
    model.eval()
    rows = []
    for site, site_dir in ctx["site_dirs"].items():
        try:
            ds = SiteDataset(site_dir, split="test", **ctx["data_kwargs"])
        except DataError as err:
            print(f"note: recon grid: site {site} skipped ({err})")
            continue
        item = ds[len(ds) // 2]
        sample = collate([item]).to(device)
        physics = sample.physics()
        with torch.no_grad():
            zf = zero_filled(sample)
            fed = physics.rss(model(sample.kspace, physics))
        ref = sample.target
        rows.append(
            {
                "site": site,
                "slice": f"{item.meta.get('file', '')}:{item.meta.get('slice', '')}",
                "zero_filled": zf[0].cpu().numpy(),
                "federated": fed[0].cpu().numpy(),
                "reference": ref[0].cpu().numpy(),
                "err_zf": (zf - ref).abs()[0].cpu().numpy(),
                "err_fed": (fed - ref).abs()[0].cpu().numpy(),
                "m_zf": all_metrics(zf, ref),
                "m_fed": all_metrics(fed, ref),
            }
        )
    return rows


def plot_recon_grid(
    results: Mapping[str, Any],
    run_dir: Path,
    path: Path,
    data_root: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> tuple[Path | None, str]:
    """Per site one test slice: zero-filled, federated, reference and both |error| maps.

    Needs ``run_dir/final_model.pt`` (``{"state_dict", "model_config"}``) and the site folders
    (``data_root`` or the run config's data root). Returns ``(path or None, note)``.
    """
    ctx, note = _grid_inputs(results, run_dir, data_root)
    if ctx is None:
        return None, note
    rows = _reconstruct(ctx, device)
    if not rows:
        return None, "recon grid skipped: no site had a usable test slice"
    plt = _pyplot()
    cols = ["zero-filled", "federated", "reference", "|error| zero-filled", "|error| federated"]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(2.3 * len(cols), 2.4 * len(rows)), squeeze=False
    )
    for i, row in enumerate(rows):
        vmax = float(row["reference"].max())
        emax = float(max(row["err_zf"].max(), row["err_fed"].max())) or 1.0
        panels = [
            (row["zero_filled"], "gray", vmax, row["m_zf"]),
            (row["federated"], "gray", vmax, row["m_fed"]),
            (row["reference"], "gray", vmax, None),
            (row["err_zf"], "inferno", emax, None),
            (row["err_fed"], "inferno", emax, None),
        ]
        for j, (img, cmap, top, m) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
            if m is not None:
                ax.set_xlabel(f"SSIM {m['ssim']:.3f} · PSNR {m['psnr']:.1f}", fontsize=7)
        axes[i][0].set_ylabel(f"{row['site']}\n{row['slice']}", fontsize=7)
    fig.suptitle(
        f"{results['name']}: one test slice per site (error maps share a scale)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""


# ----------------------------------------------------------------------------- entry point


def write_report(
    run_dir: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    grid: bool = True,
    echo: bool = True,
) -> Path:
    """Validate ``RUN_DIR/results.json``; write ``report.md`` and the figures; return the md path.

    With ``echo`` the per-site table and any skip notes are printed to stdout.
    """
    run = Path(run_dir)
    results = load_results(run)
    notes: list[str] = []
    figures: list[str] = []
    for name, fn in (
        ("metrics_vs_round.png", plot_metrics_vs_round),
        ("site_bars.png", plot_site_bars),
    ):
        if fn(results, run / name) is not None:
            figures.append(name)
        else:
            (run / name).unlink(missing_ok=True)  # never leave a stale figure from an older run
            notes.append(f"{name} skipped: nothing to plot yet")
    if grid:
        try:
            done, note = plot_recon_grid(results, run, run / "recon_grid.png", data_root, device)
        except Exception as err:
            # the tables matter more than the picture: a bad checkpoint or data folder is a note
            done, note = None, f"recon grid skipped: {type(err).__name__}: {err}"
        if done is not None:
            figures.append(done.name)
        else:
            notes.append(note)
    md = run / "report.md"
    atomic_write_text(md, render_markdown(results, figures))
    if echo:
        print(f"run {results['name']} ({results['status']})")
        print(site_table(results))
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {md}" + (f" and {', '.join(figures)}" if figures else ""))
    return md


def command(args: Any) -> int:
    """Handler of ``fedunroll report RUN_DIR [--data DIR] [--device DEV] [--no-grid]``."""
    import sys

    try:
        write_report(args.run_dir, args.data, args.device, grid=not args.no_grid)
    except (ResultsError, FileNotFoundError) as err:
        print(f"fedunroll report: {err}", file=sys.stderr)
        return 2
    return 0
