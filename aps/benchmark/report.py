"""The benchmark's table: one row per method, quality and calibration beside cost (Markdown)."""
from __future__ import annotations

import math


def _setting(m: dict) -> str:
    c, t = m["config"], m.get("tuning")
    if m["method"] == "aps":
        text = f"flow, step {c.get('step')}"
        if t is not None:
            text += f", temperature {t['chosen']:g} of {t['grid']} (by calibration)"
        elif c.get("temperature", 1) != 1:
            text += f", temperature {c['temperature']:g}"
    else:
        fixed = {k: v for k, v in c.items() if k not in ("name", "cm", "tau", "sigma_min", "sigma_max")
                 and (t is None or k != t["option"])}
        text = ", ".join(f"{k} {v}" for k, v in fixed.items() if v is not None)
        if t is not None:
            text = f"{t['option']} {t['chosen']} of {t['grid']}" + (f", {text}" if text else "")
        if isinstance(c.get("cm"), dict):
            text += ", CM " + ("ODE rk4x" + str(c["cm"].get("steps")) if c["cm"].get("type") == "exact_ode" else "learned")
    stopped = m["stats"].get("stopped")
    text = text or "-"
    return text + (f"; **stopped at the budget** ({stopped})" if stopped else "")


def _mean(s: dict, key: str, fmt: str = "{:.3f}") -> str:
    v = s.get(key, {}).get("mean") if isinstance(s.get(key), dict) else None
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _cost(m: dict) -> list[str]:
    st = m["stats"]
    nfe = f"{st['nfe']:,}" + (f" (+{st['ode_eps']:,} ODE)" if st.get("ode_eps") else "")
    sps = m.get("throughput", {}).get("samples_per_s") if m["method"] == "aps" else None
    rate = f"{st['samples_per_s']:,.0f} ({st['batch']:,})"
    if sps:
        rate += f"; {sps:,.0f} ({m['throughput']['batch']:,})"
    return [nfe, f"{st['seconds_per_sample']:.2e}", rate]


def _at(curve: dict, name: str, level: float = 0.9) -> str:
    c = curve["curves"].get(name)
    if c is None:
        return "-"
    v = c[min(range(len(curve["levels"])), key=lambda i: abs(curve["levels"][i] - level))]
    return "-" if math.isnan(v) else f"{v:.2f}"


def _tarp(m: dict) -> str:
    t = m["calibration"]["tarp"]
    return f"{t['ks']:.2f}" + (" ✓" if t["ks"] <= t["ks_bound"] else "")


def table(report: dict) -> str:
    """Markdown table of a report (aps.benchmark.runner.run_benchmark)."""
    if report["kind"] == "mixture":
        head = ["method", "setting", "TV mean / max", "KL (nats)", "SW / floor (ratio)", "cov. 0.9 (HPD)",
                "TARP KS", "NFE / sample", "s / sample", "samples/s (batch)"]
        rows = []
        for m in report["methods"]:
            s = m["summary"]
            rows.append([m["method"], _setting(m), f"{s['tv']['mean']:.3f} / {s['tv']['max']:.3f}", _mean(s, "kl"),
                         f"{s['sw']['mean']:.3f} / {s['sw_floor']['mean']:.3f} ({s['sw_over_floor']['mean']:.1f}x)",
                         f"{_at(m['calibration']['coverage'], 'all')} ({_at(m['calibration']['hpd'], 'all')})",
                         _tarp(m), *_cost(m)])
    else:
        regions = [r for r in ("stroke", "background", "unobserved") if any(
            r in m["calibration"]["coverage"]["curves"] for m in report["methods"])]
        is_class = any("class_accuracy" in m["summary"] for m in report["methods"])
        head = ["method", "setting", "PSNR mean", "PSNR sample", "SSIM sample",
                "cov. 0.9 all / " + " / ".join(regions)]
        head += ["class / judge acc."] if is_class else []
        floor = (report.get("realism_floor") or {}).get("fd")
        head += ["FD" + (f" (floor {floor:.2f})" if floor is not None else "")]
        head += ["TARP KS", "NFE / sample", "s / sample", "samples/s (batch)"]
        rows = []
        for m in report["methods"]:
            s = m["summary"]
            cov = " / ".join(_at(m["calibration"]["coverage"], r) for r in ["all", *regions])
            row = [m["method"], _setting(m), _mean(s, "psnr_mean", "{:.2f}"), _mean(s, "psnr_sample", "{:.2f}"),
                   _mean(s, "ssim_sample"), cov]
            row += [f"{_mean(s, 'class_accuracy', '{:.2f}')} / {_mean(s, 'judge_accuracy', '{:.2f}')}"] if is_class else []
            row += [f"{m['realism']['fd']:.2f}" if m.get("realism") else "-"]
            rows.append(row + [_tarp(m), *_cost(m)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def footer(report: dict) -> str:
    """What the table was measured on, in one paragraph."""
    tunes = sorted({m["tuning"]["chosen_by"] for m in report["methods"] if m.get("tuning")})
    src = report.get("problem") or {}
    what = f"MCGdiff {src['mcgdiff']}, {src['generator']} generator" if "mcgdiff" in src else report["kind"]
    text = (f"{report['checkpoint']} ({what}); scored on {report['measurements']['test']}, "
            f"{report['n_samples']} samples each; solvers tuned on {report['measurements']['tune']}"
            + (f" by {'; '.join(tunes)}" if tunes else "") + f". {report['machine']}, torch {report['torch']}, "
            f"{report['date']}. cov. 0.9: the truth's share inside the central 90% interval, from its rank among the "
            f"samples (unbiased for a calibrated sampler at any number of samples, resolution 1/{report['n_samples'] + 1}; "
            "the JSON also has coverage90_* from sample quantiles, which read low with few samples). "
            "TARP KS ✓: within its 95% Kolmogorov bound."
            + (" FD: Frechet distance of one sample per measurement to other held-out images (unpaired) in the judge "
               "classifier's pooled features; floor: the scored truths' own distance." if report["kind"] == "image" else ""))
    return text
