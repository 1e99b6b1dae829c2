"""The presets travel with the package: a built wheel holds every file of `configs/`, and
an unpacked wheel (the layout of a non-editable install) finds them from any folder."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, cwd, env=None):
    env = dict(os.environ, **(env or {}))
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def test_wheel_ships_every_preset_and_finds_them_from_another_folder(tmp_path):
    build = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), ROOT],
        cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("relax-*.whl")
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    with zipfile.ZipFile(wheel) as z:
        shipped = sorted(
            n[len("relax/configs/") :] for n in z.namelist() if n.startswith("relax/configs/")
        )
        z.extractall(tmp_path / "site")
    assert shipped == presets and "train-tiny.yaml" in shipped

    # The unpacked wheel, run from a folder with no configs/: only the shipped presets exist.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "site")}
    where = run([sys.executable, "-c", "import relax.config as c; print(c.CONFIG_DIR)"],
                cwd=work, env=env)  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip() == str(tmp_path / "site" / "relax" / "configs")
    shown = run([sys.executable, "-m", "relax.cli", "sft", "--config", "train-tiny",
                 "--print-config"], cwd=work, env=env)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert '"output_dir": "runs/tiny-sft"' in shown.stdout
