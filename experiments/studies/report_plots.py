"""docs/results.md's three plots (report.py calls them): the budget curve, the recursion with its controls, the
face-KD table as bars with error bars. matplotlib's Figure without pyplot: no global backend, works headless."""

from __future__ import annotations

from study_numbers import only_stage, stats


def _figure(width: float = 7, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots()


def plot_curve(choice: dict, path: str) -> None:
    fig, ax = _figure()
    xs = [e for e, _ in choice["points"]]
    ms = [stats(a) for _, a in choice["points"]]
    ax.errorbar(xs, [m for m, _, _ in ms], yerr=[s for _, s, _ in ms], marker="o", capsize=3, color="black")
    ax.axvline(choice["epochs"], linestyle=":", color="grey", label=f"budget E = {choice['epochs']}")
    ax.set(xlabel="epochs (one schedule)", ylabel="accuracy (%)", title="scratch student: accuracy against budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png")


def plot_recursion(arms: list, path: str) -> None:
    """arms: report.recursion_arms."""
    fig, ax = _figure(8, 5)
    groups: dict = {}
    for label, loss, total, cell in arms:
        kind = ("scratch" if label == "scratch" else f"{loss}: one schedule" if label == "one schedule" else
                f"{loss}: born-again chain" if label.startswith("born-again") else f"{loss}: generations")
        if loss == "equivalent_angular" and kind.endswith("one schedule"):
            groups.setdefault(f"{loss}: generations", [])  # keep the chain first in the legend
        groups.setdefault(kind, []).append((total, stats(cell["acc"])))
    for kind, pts in groups.items():
        pts = [(x, m, s) for x, (m, s, _) in pts if m is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        linestyle="--" if "schedule" in kind or kind == "scratch" else "-", label=kind)
    ax.set(xlabel="total epochs (generation k: k x E)", ylabel="accuracy (%)",
           title="recursion against one schedule as long (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")


def plot_table(table: dict, cases: list, path: str) -> None:
    """cases: the rows in the report's order (report.table_order)."""
    fig, axes = _figure(11, 4.5)
    fig.clear()
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("acc", "ijb"), ("verification accuracy (%)", "IJB-C TAR@FAR=1e-4 (%)"),
                              strict=True):
        ms = [stats(only_stage(table, c)[key]) for c in cases]
        ax.barh(range(len(cases)), [m or 0 for m, _, _ in ms], xerr=[s or 0 for _, s, _ in ms], capsize=3,
                color=["grey" if c.startswith("scratch") else "tab:blue" for c in cases])
        ax.set_yticks(range(len(cases)), cases, fontsize="small")
        ax.invert_yaxis()
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="x")
        vals = [m for m, _, _ in ms if m is not None]
        if vals and key == "acc":
            ax.set_xlim(max(0, min(vals) - 10), min(100, max(vals) + 5))
    fig.savefig(path, format="png")
