"""The machine a run measured on, and the markdown tables and report of its sections."""
import os
import platform
from importlib import metadata
from pathlib import Path

import faiss
import psutil
import torch


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "faiss": faiss.__version__,
        "torchserve": package_version("torchserve"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def format_machine(machine: dict) -> str:
    return (f"Machine: {machine['cpu']}, {machine['logical_cores']} logical / {machine['physical_cores']} physical "
            f"cores, {machine['ram_gib']} GiB RAM ({machine['ram_available_gib']} GiB available), load average "
            f"{machine['load_average_1m']} at start\n"
            f"Software: Python {machine['python']}, torch {machine['torch']}, torchvision {machine['torchvision']}, "
            f"faiss {machine['faiss']}, torchserve {machine['torchserve']}; threads: torch "
            f"{machine['torch_threads']} (interop {machine['torch_interop_threads']}), "
            f"faiss {machine['faiss_threads']}")


def format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with `columns` given as (key, heading); missing values are blank."""
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def render_section(name: str, section: dict, cores: int) -> str:
    """A section's heading, its models, its table and legend, and how long and how disturbed its run was."""
    parts = [f"## {name}", ""]
    for model, source in section.get("models", {}).items():
        parts.append(f"- {model}: {source}")
    if section.get("models"):
        parts.append("")
    before, after = section["load_average"]
    parts += [markdown_table(section["rows"], section["columns"]), "", section["legend"],
              f"Measured in {section['seconds']:.0f} s; 1-minute load average {before:.1f} → {after:.1f} "
              f"({cores} cores)."]
    return "\n".join(parts)


def render_report(machine: dict, settings: dict, sections: dict) -> str:
    parts = ["# Benchmark", "", format_machine(machine), "",
             f"Profile: {'quick' if settings['quick'] else 'full'}; sections: {', '.join(sections)}"]
    for name, section in sections.items():
        parts += ["", render_section(name, section, machine["logical_cores"])]
    return "\n".join(parts) + "\n"


def raw_figures(machine: dict, settings: dict, sections: dict) -> dict:
    """What --json writes: the machine, the settings and every section's rows and legend."""
    return {"machine": machine,
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in settings.items()},
            "sections": {name: {key: value for key, value in section.items() if key != "columns"}
                         for name, section in sections.items()}}
