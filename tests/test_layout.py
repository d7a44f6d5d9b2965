"""The package's layering and its public face: imports run downwards only, and the 0.1 module
paths still import (as aliases of the same module objects)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "hybrid_fc")

# what each part of the package may import from the rest of it (the README's Layout)
LAYER = {"common": 0, "collectives": 1, "runtime": 2, "head": 3, "data": 3, "backbones": 3,
         "training": 4, "evaluation": 5}


def _part(module: str) -> str:
    """'hybrid_fc.training.trainer' -> 'training'."""
    return module.split(".")[1]


def _imports(path: str, module: str):
    """The hybrid_fc modules `path` imports (absolute or relative), anywhere in the file."""
    tree = ast.parse(open(path).read())
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("hybrid_fc."):
                    yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("hybrid_fc."):
                for a in node.names:  # `from . import kernels` names a module too
                    yield name if node.module else f"{name}.{a.name}"


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def test_imports_run_downwards_only():
    """Bug caught: a package importing one above it (e.g. the trainer importing evaluation for
    its verification hook, which imports training for checkpoints: a circle)."""
    wrong = []
    for path, module in _modules():
        if module == "hybrid_fc":
            continue
        mine = LAYER[_part(module)]
        for target in _imports(path, module):
            theirs = LAYER[_part(target)]
            if _part(target) != _part(module) and theirs >= mine:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_sees_a_wrong_import(tmp_path):
    """The check above can fail: a relative import upwards is found."""
    bad = tmp_path / "x.py"
    bad.write_text("from ..evaluation import build_verification\n")
    assert list(_imports(str(bad), "hybrid_fc.training.x")) == ["hybrid_fc.evaluation"]


def test_public_api_and_old_module_paths():
    code = (
        "import warnings, hybrid_fc\n"
        "from hybrid_fc import PartialFC, ArcFace, HybridEngine, Trainer, SparseSGD\n"
        "import hybrid_fc.head.partial_fc as p, hybrid_fc.training.engine as e\n"
        "assert PartialFC is p.PartialFC and HybridEngine is e.HybridEngine\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import hybrid_fc.engine as old\n"
        "    from hybrid_fc.optim import SparseSGD as S\n"
        "    import hybrid_fc.kernels.triton_ce\n"
        "assert old is e and S is SparseSGD\n"
        "import hybrid_fc.head.kernels.triton_ce as k\n"
        "assert hybrid_fc.kernels.triton_ce is k  # one module object, never two copies\n"
        "assert any('moved to hybrid_fc.training.engine' in str(x.message) for x in w)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_import_hybrid_fc_does_not_start_deepspeed():
    r = subprocess.run([sys.executable, "-c", "import sys, hybrid_fc; "
                        "print('deepspeed' in sys.modules)"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_every_old_path_names_a_module():
    import importlib.util
    import hybrid_fc
    missing = [old for old, new in hybrid_fc._MOVED.items()
               if importlib.util.find_spec(f"hybrid_fc.{new}") is None]
    assert not missing
