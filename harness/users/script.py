"""Loading a user script: a file (`--users path/to/flows.py`) or a bundled example (`--users agent`).

The script is imported once in the main process, before any load is sent, so
a script that does not import or defines no usable `User` is a usage error
(exit 2) whose message carries the script's own traceback line. Each worker
process imports it again by path (user code runs where the calls are made).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from servescope.errors import UsageError
from servescope.harness.users.user import User, check_user_class, describe_wait, user_tasks

EXAMPLES_PACKAGE = "servescope.workloads.users"


class UserScriptError(UsageError):
    """A user script that cannot run; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class UserClassInfo:
    name: str
    weight: float
    tasks: dict[str, int]
    wait_time: str
    session_tasks: int
    tenant: str | None = None


@dataclass
class LoadedScript:
    """A script's module and its runnable user classes, in definition order."""

    path: Path
    module: ModuleType
    classes: dict[str, type[User]] = field(default_factory=dict)

    def describe(self) -> list[UserClassInfo]:
        return [UserClassInfo(name, float(cls.weight), {t: w for t, (_, w) in user_tasks(cls).items()},
                              describe_wait(cls.wait_time), cls.session_tasks, cls.tenant)
                for name, cls in self.classes.items()]

    def to_json(self) -> dict[str, Any]:
        return {"script": str(self.path), "classes": [vars(info) for info in self.describe()]}


def bundled_scripts() -> dict[str, Path]:
    """The example scripts shipped with servescope, by name (file stem)."""
    # harness/users/ -> the package root: the checkout's root, or the installed servescope/ (both hold workloads/)
    folder = Path(__file__).resolve().parents[2] / "workloads" / "users"
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def resolve_script(spec: str) -> Path:
    """A path for `--users`: an existing .py file, or the name of a bundled example."""
    path = Path(spec)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise UserScriptError(f"--users {spec}: no such file (give a Python file defining User classes, "
                                  f"or a bundled example: {', '.join(bundled_scripts())})")
        return path.resolve()
    examples = bundled_scripts()
    if spec in examples:
        return examples[spec]
    raise UserScriptError(f"--users {spec}: neither a .py file nor a bundled example; bundled: {', '.join(examples)} "
                          "(`servescope workloads list` shows them)")


def load_script(spec: str | Path) -> LoadedScript:
    """Import a user script and collect its runnable `User` subclasses; UserScriptError when it cannot run."""
    path = resolve_script(str(spec))
    module = _import(path)
    classes: dict[str, type[User]] = {}
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, User) and not value.abstract:
            classes[value.__name__] = value
    if not classes:
        raise UserScriptError(f"{path}: defines no User subclass; write `class MyUser(User):` with at least one "
                              "`@task async def ...(self)` (see `servescope workloads show agent`)")
    problems = [p for cls in classes.values() for p in check_user_class(cls)]
    if problems:
        raise UserScriptError(f"{path}: " + "; ".join(problems))
    return LoadedScript(path, module, classes)


def _import(path: Path) -> ModuleType:
    name = f"servescope_user_script_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserScriptError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise UserScriptError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}\n  {(exc.text or '').rstrip()}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of user code is the user's to fix
        del sys.modules[name]
        raise UserScriptError(f"{path}: failed to import: {type(exc).__name__}: {exc}\n"
                              f"  at {script_location(exc, path) or '?'}") from None
    return module


def script_location(exc: BaseException, path: Path | str | None = None) -> str | None:
    """`file:line (in function)` of the deepest traceback frame inside the script (else the deepest frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    wanted = str(Path(path).resolve()) if path else None
    inside = [f for f in frames if wanted and str(Path(f.filename).resolve()) == wanted]
    frame = (inside or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} (in {frame.name})"
