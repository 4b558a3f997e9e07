"""The benchmark's pictures (matplotlib, Agg backend: no display needed), small PNGs.

    quality_vs_time.png   the headline quality against seconds per sample (log x), one point per method
    coverage.png          expected coverage: credible level against empirical coverage, per region or dimension,
                          with the binomial band of a calibrated sampler around the diagonal
    tarp.png              TARP expected-coverage probability against the credible level, with its KS band
    sbc_ranks.png         mixtures: SBC rank histograms per dimension, with the band of a uniform histogram
    samples.png           mixtures: each method's samples over the exact posterior (2-D: the first two
                          coordinates, or the exact posterior's top two principal directions when d > 2);
                          images: measurement | samples, mean and pixel std of each method | truth, >= 128 px a digit
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

DPI = 80
COLORS = {"aps": "C3", "dps": "C0", "cm1": "C2", "cm2": "C1", "ddrm": "C4", "prior": "0.5"}


def _color(name: str) -> str:
    return COLORS.get(name, "C5")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def quality_vs_time(report: dict, target, path: Path) -> Path:
    """Headline quality (mixtures: SW to the exact posterior, lower is better; images: single-sample PSNR or judge
    accuracy) against seconds per sample, log x."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=DPI)
    key = None
    for m in report["methods"]:
        key, value = target.headline(m["summary"])
        t = m["stats"]["seconds_per_sample"]
        ax.scatter([t], [value], color=_color(m["method"]), s=40, zorder=3)
        label = m["method"] + (" (stopped)" if m["stats"].get("stopped") else "")
        ax.annotate(label, (t, value), textcoords="offset points", xytext=(5, 4), fontsize=9)
        if key == "sw":
            ax.axhline(m["summary"]["sw_floor"]["mean"], color="0.7", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per sample")
    ax.set_ylabel({"sw": "sliced Wasserstein to the exact posterior (lower is better)",
                   "psnr_sample": "PSNR of one sample (dB)", "judge_accuracy": "judge accuracy"}.get(key, key),
                  fontsize=8)
    ax.set_title(f"{Path(report['checkpoint']).name}: quality against cost", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _diagonal(ax, levels, band):
    lv = [0.0, *levels, 1.0]
    bd = [0.0, *band, 0.0]
    ax.fill_between(lv, [a - b for a, b in zip(lv, bd)], [a + b for a, b in zip(lv, bd)], color="0.85", lw=0)
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")


def coverage_curves(report: dict, path: Path, max_panels: int = 4) -> Path:
    """Expected coverage per region (images) or per dimension (mixtures; "all" pools them), all methods."""
    first = report["methods"][0]["calibration"]["coverage"]
    names = list(first["curves"])[:max_panels]
    extra = ["hpd"] if "hpd" in report["methods"][0]["calibration"] else []
    k = len(names) + len(extra)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.9), dpi=DPI, squeeze=False)
    for ax, name in zip(axes[0], names + extra):
        ref = first if name != "hpd" else report["methods"][0]["calibration"]["hpd"]
        _diagonal(ax, ref["levels"], ref["band"])
        for m in report["methods"]:
            cv = m["calibration"]["hpd" if name == "hpd" else "coverage"]
            curve = cv["curves"]["all" if name == "hpd" else name]
            ax.plot(cv["levels"], curve, color=_color(m["method"]), lw=1.5, label=m["method"])
        ax.set_title("HPD of the exact density" if name == "hpd" else name, fontsize=9)
        ax.set_xlabel("credible level", fontsize=8)
    axes[0][0].set_ylabel("empirical coverage", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"expected coverage (band: 95%, {first['n_units']} measurements)", fontsize=9)
    return _save(fig, path)


def tarp_curves(report: dict, path: Path) -> Path:
    """TARP ECP against the credible level for every method, with the 95% Kolmogorov band of an exact sampler."""
    fig, ax = plt.subplots(figsize=(3.4, 3.4), dpi=DPI)
    t0 = report["methods"][0]["calibration"]["tarp"]
    _diagonal(ax, t0["levels"], [t0["ks_bound"]] * len(t0["levels"]))
    for m in report["methods"]:
        t = m["calibration"]["tarp"]
        ax.plot(t["levels"], t["ecp"], color=_color(m["method"]), lw=1.5, label=f"{m['method']} (KS {t['ks']:.2f})")
    ax.set_xlabel("credible level", fontsize=8)
    ax.set_ylabel("expected coverage probability", fontsize=8)
    ax.set_title(f"TARP ({t0['n_units']} measurements)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def sbc_histograms(report: dict, path: Path, max_dims: int = 4) -> Path:
    """Rows: methods; columns: dimensions; bars: rank counts; grey: the 99% band of a uniform histogram."""
    methods = report["methods"]
    d = min(len(methods[0]["calibration"]["sbc"]["counts"]), max_dims)
    fig, axes = plt.subplots(len(methods), d, figsize=(2.2 * d, 1.3 * len(methods)), dpi=DPI, squeeze=False)
    for i, m in enumerate(methods):
        h = m["calibration"]["sbc"]
        for j in range(d):
            ax = axes[i][j]
            x = [(b + 0.5) / h["bins"] for b in range(h["bins"])]
            ax.axhspan(h["expected"] - h["band"], h["expected"] + h["band"], color="0.85", lw=0)
            ax.bar(x, h["counts"][j], width=1 / h["bins"], color=_color(m["method"]), alpha=0.8)
            ax.set_xlim(0, 1)
            ax.set_yticks([])
            ax.set_xticks([] if i < len(methods) - 1 else [0, 0.5, 1])
            if j == 0:
                ax.set_ylabel(m["method"], fontsize=8)
            if i == 0:
                ax.set_title(f"x{j} rank", fontsize=8)
    fig.suptitle("SBC ranks of the truth among the samples", fontsize=9)
    return _save(fig, path)


def mixture_samples(report: dict, samples: dict, target, y, path: Path, n_y: int = 3, n_show: int = 400) -> Path:
    """Rows: measurements; columns: methods; grey: exact posterior samples, colour: the method's, in 2-D."""
    methods = [m["method"] for m in report["methods"]]
    post = target.prior.posterior(target.operator, y[:n_y])
    exact = post.sample(2000, generator=torch.Generator().manual_seed(0))  # (n_y, 2000, d)
    fig, axes = plt.subplots(len(exact), len(methods), figsize=(2.3 * len(methods), 2.3 * len(exact)), dpi=DPI,
                             squeeze=False)
    for i in range(len(exact)):
        e = exact[i].double()
        if e.shape[1] > 2:  # the exact posterior's top two principal directions
            mu = e.mean(0)
            basis = torch.linalg.svd(e - mu, full_matrices=False).Vh[:2].T
        else:
            mu, basis = torch.zeros(e.shape[1], dtype=e.dtype), torch.eye(2, dtype=e.dtype)
        pe = (e - mu) @ basis
        lo, hi = pe.min(0).values, pe.max(0).values
        pad = 0.15 * (hi - lo)
        for j, name in enumerate(methods):
            ax = axes[i][j]
            ps = (samples[name][i, :n_show].double() - mu) @ basis
            ax.scatter(pe[:, 0], pe[:, 1], s=2, color="0.75", lw=0)
            ax.scatter(ps[:, 0], ps[:, 1], s=3, color=_color(name), lw=0, alpha=0.7)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i][0].set_ylabel(f"y {i}", fontsize=8)
    fig.suptitle("samples (colour) over the exact posterior (grey)"
                 + (": top-2 principal directions" if exact.shape[2] > 2 else ""), fontsize=9)
    return _save(fig, path)


def image_grid(report: dict, samples: dict, target, x_true, y, path: Path, n_y: int = 4, n_show: int = 2,
               cell_px: int = 136) -> Path:
    """Rows: measurements; columns: measurement | per method: n_show samples, mean, pixel std | truth.
    Every digit is drawn at cell_px >= 128 pixels (nearest upsampling, no interpolation blur)."""
    from ..image_grid import STD_WHITE, measurement_image

    methods = [m["method"] for m in report["methods"]]
    n_y = min(n_y, len(x_true))
    cols = ["measurement"] + [f"{name} {lab}" for name in methods
                              for lab in [*(f"#{k + 1}" for k in range(n_show)), "mean", "std"]] + ["truth"]
    meas = measurement_image(target.operator, y[:n_y].cpu())
    inch = cell_px / DPI
    fig, axes = plt.subplots(n_y, len(cols), figsize=(inch * len(cols), inch * n_y + 0.4), dpi=DPI, squeeze=False)
    fig.subplots_adjust(wspace=0.02, hspace=0.02, left=0, right=1, bottom=0, top=1 - 0.4 / (inch * n_y + 0.4))
    for i in range(n_y):
        tiles = [meas[i]]
        for name in methods:
            x = samples[name][i].clamp(-1, 1).float()
            std = x.std(0) if len(x) > 1 else torch.zeros_like(x[0])
            tiles += [x[k] for k in range(min(n_show, len(x)))] + [torch.zeros_like(x[0])] * (n_show - min(n_show, len(x)))
            tiles += [x.mean(0), (std / STD_WHITE).clamp(0, 1) * 2 - 1]
        tiles.append(x_true[i].float())
        for j, t in enumerate(tiles):
            ax = axes[i][j]
            img = t.permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow((img + 1) / 2, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
    return _save(fig, path)


def draw_all(report: dict, samples: dict, target, x_true, y, folder: Path) -> list[Path]:
    """Every figure of the module docstring that applies to the report's kind; returns their paths."""
    folder = Path(folder)
    paths = [quality_vs_time(report, target, folder / "quality_vs_time.png"),
             coverage_curves(report, folder / "coverage.png"), tarp_curves(report, folder / "tarp.png")]
    if report["kind"] == "mixture":
        paths.append(sbc_histograms(report, folder / "sbc_ranks.png"))
        paths.append(mixture_samples(report, samples, target, y, folder / "samples.png"))
    else:
        paths.append(image_grid(report, samples, target, x_true, y, folder / "samples.png"))
    return paths

