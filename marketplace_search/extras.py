"""Whether a package of the project's optional extras (pyproject.toml) is installed, and what to say if not."""
import importlib.util


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs_extra(feature: str, package: str, extra: str) -> str:
    """The message for FEATURE, which needs PACKAGE from the project's EXTRA extra."""
    return (f"{feature} needs {package}, the project's '{extra}' extra: pip install -e '.[{extra}]' "
            "(make venv installs every extra)")
