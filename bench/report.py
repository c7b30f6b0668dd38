"""Turn the run's JSON lines into a markdown table, a PNG chart and printed ratios.

Aggregation: for every (scenario, system, metric) the median and min–max over
the rounds that succeeded. The ratio to direct is computed per round (the
system's primary metric over direct's in the same round) and then summarised
the same way, so slow drift of the machine between rounds cancels out. S3's
added latency is likewise the per-round difference to direct.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spec:
    title: str
    primary: str
    higher_is_better: bool
    columns: tuple[tuple[str, str], ...]  # (metric, heading)


RATE = (("rps", "req/s"),)
# Kernel memory per connection, machine-wide (every socket of the client, the
# proxy and the backend), and what a proxy adds over direct's in the same round.
KERNEL = (("kernel_kib_per_conn", "kernel KiB/conn"),
          ("kernel_added_kib", "kernel added vs direct KiB/conn"))
SPECS: dict[str, Spec] = {
    "S1-1": Spec("S1 bulk TCP, iperf3 1 stream", "gbps", True,
                 (("gbps", "Gbit/s"), ("proxy_cpu_pct", "proxy CPU %"))),
    "S1-4": Spec("S1 bulk TCP, iperf3 4 streams", "gbps", True,
                 (("gbps", "Gbit/s"), ("proxy_cpu_pct", "proxy CPU %"))),
    "S2": Spec("S2 new connection per request (wrk, Connection: close, 100-byte body)", "rps",
               True, (*RATE, ("p99_ms", "p99 ms"), ("proxy_cpu_pct", "proxy CPU %"),
                      ("errors", "wrk errors"))),
    "S3": Spec("S3 keep-alive requests (wrk, 100-byte body)", "rps", True,
               (*RATE, ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                ("added_p50_ms", "added p50 ms"), ("added_p99_ms", "added p99 ms"),
                ("proxy_cpu_pct", "proxy CPU %"), ("errors", "wrk errors"))),
    "S4": Spec("S4 UDP request/response, 64-byte datagrams", "rps", True,
               (("rps", "replies/s"), ("p99_ms", "p99 ms"), ("lost", "lost"),
                ("proxy_cpu_pct", "proxy CPU %"))),
    "S5-2k": Spec("S5 proxy RSS and kernel memory per idle connection, 2,000 connections",
                  "kib_per_conn", False,
                  (("kib_per_conn", "KiB/conn"), ("connections", "reached"),
                   ("base_rss_mib", "idle RSS MiB"), ("rss_mib", "RSS MiB"), *KERNEL)),
    "S5-10k": Spec("S5 proxy RSS and kernel memory per idle connection, 10,000 connections",
                   "kib_per_conn", False,
                   (("kib_per_conn", "KiB/conn"), ("connections", "reached"),
                    ("base_rss_mib", "idle RSS MiB"), ("rss_mib", "RSS MiB"), *KERNEL)),
    "C1-1": Spec("C1 services-file change to serving, 1 service", "serve_ms", False,
                 (("serve_ms", "serving ms"), ("table_ms", "table printed ms"))),
    "C1-100": Spec("C1 ... 100 services", "serve_ms", False,
                   (("serve_ms", "serving ms"), ("table_ms", "table printed ms"))),
    "C1-1k": Spec("C1 ... 1,000 services", "serve_ms", False,
                  (("serve_ms", "serving ms"), ("table_ms", "table printed ms"))),
    "C1-10k": Spec("C1 ... 10,000 services (RSS with 10k services)", "serve_ms", False,
                   (("serve_ms", "serving ms"), ("table_ms", "table printed ms"),
                    ("rss_mib", "RSS MiB"))),
    "C1-10k+1": Spec("C1 one more service on top of 10,000", "serve_ms", False,
                     (("serve_ms", "serving ms"), ("table_ms", "table printed ms"))),
}


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def summary(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


class Table:
    """Records of one run, grouped, with per-round ratios and differences to direct."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.meta = next((r for r in records if r.get("kind") == "run"), {})
        rows = [r for r in records if r.get("kind") == "result"]
        self.order: list[str] = list(dict.fromkeys(r["system"] for r in rows))
        self.scenarios: list[str] = [s for s in SPECS if any(r["scenario"] == s for r in rows)]
        self.values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list))
        self.notes: dict[tuple[str, str], list[str]] = defaultdict(list)
        direct = {(r["round"], r["scenario"]): r["metrics"] for r in rows
                  if r["system"] == "direct" and r["ok"]}
        for r in rows:
            key = (r["scenario"], r["system"])
            if not r["ok"]:
                note = r.get("note", "")
                if note and note not in self.notes[key]:
                    self.notes[key].append(note)
                continue
            metrics = dict(r["metrics"])
            base = direct.get((r["round"], r["scenario"]))
            spec = SPECS.get(r["scenario"])
            if base and spec and spec.primary in metrics and base.get(spec.primary):
                metrics["ratio"] = metrics[spec.primary] / base[spec.primary]
            if base and r["scenario"].startswith("S5") and r["system"] != "direct" and (
                    "kernel_kib_per_conn" in metrics and "kernel_kib_per_conn" in base):
                metrics["kernel_added_kib"] = (metrics["kernel_kib_per_conn"]
                                               - base["kernel_kib_per_conn"])
            if base and r["scenario"] == "S3":
                for pct in ("p50_ms", "p99_ms"):
                    if pct in metrics and pct in base:
                        metrics[f"added_{pct}"] = metrics[pct] - base[pct]
            for name, value in metrics.items():
                self.values[key][name].append(float(value))

    def ratio(self, scenario: str, system: str) -> float | None:
        ratios = self.values.get((scenario, system), {}).get("ratio")
        return statistics.median(ratios) if ratios else None

    def markdown(self) -> str:
        meta = self.meta
        out = [
            "# uproxy benchmark",
            "",
            f"- date: {meta.get('date', '?')}; rounds: {meta.get('rounds', '?')} "
            f"(interleaved: each round runs every system); mode: "
            f"{'quick' if meta.get('quick') else 'full'}",
            f"- machine: {meta.get('machine', '?')}",
            f"- software: {meta.get('software', '?')}",
            "- pinning: load generators and backends on cpu 1 (`taskset -c 1`); " + "; ".join(
                f"{name}: {pin}" for name, pin in meta.get("pinning", {}).items()),
            f"- load: {meta.get('load', '?')}",
            *([f"- loopback receive steered by RPS to cpu mask {meta['lo_rps_cpus']} "
               "(`--lo-rps-cpus`): receive work and sockmap's redirect work run there"]
              if meta.get("lo_rps_cpus") else []),
            "- cells: median (min–max) over rounds; ratio: per-round value / direct's in the "
            "same round, median (min–max); n/a: not applicable, skip: could not run",
            "",
        ]
        for scenario in self.scenarios:
            spec = SPECS[scenario]
            has_ratio = any(self.values[(scenario, s)].get("ratio") for s in self.order)
            heads = ["system", *(h for _, h in spec.columns)] + (["× direct"] if has_ratio else [])
            out += [f"## {scenario}: {spec.title}", "",
                    "| " + " | ".join(heads) + " |",
                    "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
            for system in self.order:
                key = (scenario, system)
                vals = self.values.get(key, {})
                if not any(vals.get(m) for m, _ in spec.columns):
                    if self.notes.get(key):
                        note = "; ".join(self.notes[key])
                        out.append(f"| {system} | " + note.replace("|", "/")
                                   + " |" * (len(heads) - 1))
                    continue
                cells = [summary(vals.get(m, [])) for m, _ in spec.columns]
                if has_ratio:
                    cells.append(summary(vals.get("ratio", [])) + "×" if vals.get("ratio")
                                 else "–")
                out.append(f"| {system} | " + " | ".join(cells) + " |")
            out.append("")
        return "\n".join(out)

    def printed(self) -> str:
        lines = []
        for scenario in self.scenarios:
            spec = SPECS[scenario]
            parts = []
            for system in self.order:
                vals = self.values.get((scenario, system), {})
                if not vals.get(spec.primary):
                    continue
                ratio = self.ratio(scenario, system)
                parts.append(f"{system} {fmt(statistics.median(vals[spec.primary]))}"
                             + (f" ({ratio:.2f}×)" if ratio is not None else ""))
            lines.append(f"{scenario:9} {spec.primary:13} " + ", ".join(parts))
        return "\n".join(lines)

    def chart(self, path: Path) -> str | None:
        """A PNG, one panel per scenario; None when matplotlib is missing (it is optional)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib not installed (pip install 'uproxy[bench]'): no chart"
        scenarios = [s for s in self.scenarios
                     if any(self.values[(s, n)].get(SPECS[s].primary) for n in self.order)]
        c1 = [s for s in scenarios if s.startswith("C1")]
        scenarios = [s for s in scenarios if not s.startswith("C1")] + (["C1"] if c1 else [])
        if not scenarios:
            return "nothing to chart"
        cols = 3
        rows = (len(scenarios) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(scenarios):]:
            ax.axis("off")
        for ax, scenario in zip(axes.flat, scenarios, strict=False):
            if scenario == "C1":
                self._c1_panel(ax, c1)
                continue
            spec = SPECS[scenario]
            use_ratio = any(self.values[(scenario, s)].get("ratio") for s in self.order)
            metric = "ratio" if use_ratio else spec.primary
            names, meds, lo, hi = [], [], [], []
            for system in self.order:
                vals = self.values.get((scenario, system), {}).get(metric)
                if not vals:
                    continue
                med = statistics.median(vals)
                names.append(system)
                meds.append(med)
                lo.append(med - min(vals))
                hi.append(max(vals) - med)
            colors = ["#d62728" if n.startswith("uproxy") else "#7f7f7f" if n == "direct"
                      else "#1f77b4" for n in names]
            ax.barh(names, meds, xerr=[lo, hi], color=colors, capsize=3)
            ax.invert_yaxis()
            ax.set_title(f"{scenario}: " + (f"{spec.primary} / direct" if use_ratio
                                            else spec.primary), fontsize=9)
            ax.tick_params(labelsize=8)
            if use_ratio:
                ax.axvline(1.0, color="black", linewidth=0.6)
        fig.suptitle(f"uproxy benchmark {self.meta.get('date', '')} — median, bars min–max "
                     "(S1–S4: higher is better; S5, C1: lower is better)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None

    def _c1_panel(self, ax: Any, scenarios: list[str]) -> None:
        """All C1 sizes in one panel: serving time per size, per uproxy system."""
        labels, meds, lo, hi = [], [], [], []
        for scenario in scenarios:
            for system in self.order:
                vals = self.values.get((scenario, system), {}).get("serve_ms")
                if not vals:
                    continue
                med = statistics.median(vals)
                labels.append(scenario if system == "uproxy" else f"{scenario} {system}")
                meds.append(med)
                lo.append(med - min(vals))
                hi.append(max(vals) - med)
        ax.barh(labels, meds, xerr=[lo, hi], color="#d62728", capsize=3)
        ax.invert_yaxis()
        ax.set_title("C1: services-file change to serving, ms", fontsize=9)
        ax.tick_params(labelsize=8)
