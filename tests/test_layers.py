"""The layers point one way: models <- data <- train (components <- recipes <- engines and
CLIs); eval's metric libraries are leaves, and eval's CLI reaches train only through the
recipe registry. Checked on the import statements of every module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "data", "train", "eval", "launchers", "benchmarks")


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports (dotted names), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in found if n.split(".")[0] in PACKAGES}


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...], allowed: dict[str, set[str]] = {}) -> list[str]:
    out = []
    for path in modules(folder):
        rel = str(path.relative_to(ROOT))
        for name in sorted(project_imports(path)):
            if name.startswith(forbidden) and name not in allowed.get(rel, set()):
                out.append(f"{rel} imports {name}")
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("models", ("data", "train", "eval", "launchers", "benchmarks")),
    ("data", ("train", "eval", "launchers", "benchmarks")),
    ("train", ("eval", "launchers", "benchmarks")),
    ("train/recipes", ("train.recipes.", "train.engine", "train.closed_form", "train.main", "train.reconstruct",
                       "train.registry")),
    ("train/components", ("train.recipes", "train.engine", "train.closed_form", "train.main", "train.registry")),
])
def test_lower_layers_do_not_import_higher_ones(folder, forbidden):
    assert offenders(folder, forbidden) == []


def test_eval_reaches_train_only_through_the_registry_in_its_cli():
    allowed = {cli: {"train", "train.registry"} for cli in ("eval/main.py", "eval/retrieve.py")}  # the two CLIs
    assert offenders("eval", ("train", "launchers", "benchmarks"), allowed) == []


def test_eval_metric_libraries_are_leaves():
    for name in ("metrics", "features", "resize", "retrieval_index"):
        imports = project_imports(ROOT / "eval" / f"{name}.py")
        assert not {i for i in imports if i.startswith(("eval.report", "eval.main", "eval.images", "eval.figures",
                                                        "eval.retrieve"))}


def test_recipes_are_found_by_the_registry_alone():
    for path in [*modules("train"), *modules("eval"), *modules("launchers"), *modules("benchmarks")]:
        text = path.read_text()
        assert "__import__(" not in text and "import_module(" not in text or path.name == "registry.py", path
