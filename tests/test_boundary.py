"""The core library never imports the study's dependencies (Ray, Optuna, pyarrow; MLflow, W&B)."""

import pkgutil
import subprocess
import sys

import mriadv


def test_core_does_not_import_study_dependencies():
    modules = [m.name for m in pkgutil.walk_packages(mriadv.__path__, "mriadv.")]
    assert "mriadv.fit" in modules and "mriadv.data.files" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'optuna', 'pyarrow', 'mlflow', 'wandb'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"mriadv imported: {out.stdout.strip()}"
