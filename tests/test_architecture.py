"""The layer rules of docs/ARCHITECTURE.md, read from the code's imports (static: nothing is run)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sed_megatron")

LAYERS = {  # top-level module or package of sed_megatron -> layer
    "utils": 0, "parallel": 0,
    "loss": 1, "runtime": 1, "launch": 1,
    "models": 2, "data": 2, "testing": 2, "lora": 2.5,
    "training": 3, "eval": 3, "world": 3,
    "convert": 4,
    "pipeline": 5,
    "cli": 6, "train": 6,
}


def imports():
    """{module path: set of sed_megatron modules it imports}, relative imports resolved."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            package = parts[:-1] if name != "__init__.py" else parts[:-1]
            targets = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package[:len(package) - node.level + 1]
                        module = ".".join(base + ([node.module] if node.module else []))
                    else:
                        module = node.module or ""
                    targets.update([module] + [f"{module}.{a.name}" for a in node.names])
                elif isinstance(node, ast.Import):
                    targets.update(a.name for a in node.names)
            found[os.path.relpath(path, PACKAGE)] = targets
    return found


def top(module):
    parts = module.split(".")
    return parts[1] if parts[0] == "sed_megatron" and len(parts) > 1 else None


def test_every_module_has_a_layer():
    names = {name[:-3] if name.endswith(".py") else name for name in os.listdir(PACKAGE)
             if name != "__init__.py" and not name.startswith("__") and not name.startswith(".")}
    assert names == set(LAYERS), names ^ set(LAYERS)


def test_imports_go_down_and_packages_do_not_import_each_other():
    edges = set()
    for path, targets in imports().items():
        source = path.split(os.sep)[0].removesuffix(".py")
        for target in filter(None, map(top, targets)):
            if target in LAYERS and target != source:
                assert LAYERS[target] <= LAYERS[source], f"{path} imports sed_megatron.{target} (a higher layer)"
                edges.add((source, target))
    assert not {(a, b) for a, b in edges if (b, a) in edges}, "two packages import each other"


def test_converters_stand_in_the_world_not_the_training_parser():
    """convert/ builds Megatron's args and models through world.py, never through training/."""
    for path, targets in imports().items():
        if path.startswith("convert" + os.sep):
            assert not any(top(t) == "training" for t in targets), f"{path} imports sed_megatron.training"


def test_loss_math_has_no_collectives_and_library_code_no_global_groups():
    for path, targets in imports().items():
        if path.startswith(os.path.join("loss", "kinds")) or path in (os.path.join("loss", "math.py"),
                                                                     os.path.join("loss", "chunks.py")):
            assert not any(t.startswith("torch.distributed") for t in targets), path
        allowed = ("world.py",)
        if path not in allowed:
            assert not any("parallel_state" in t for t in targets), f"{path} looks up parallel_state"
