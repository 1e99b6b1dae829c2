"""Stage caching of `relax demo`: a stage is done when `<out>/<name>/stage.json` holds its
settings, so a rerun skips it; `--fresh` retrains everything.

Settings are compared as plain JSON (dataclasses expanded), and a stage that starts
empties its folder first, so a cut-short stage never counts as done.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import time


class Stages:
    """The stages of one demo output folder: which are done, their folders and timings."""

    def __init__(self, out, fresh, progress=True):
        self.out, self.fresh, self.times = out, fresh, {}
        self.progress = progress
        """Progress bars of the training, filter and eval stages (`--no-progress`: none)."""

    def path(self, name, *parts):
        return os.path.join(self.out, name, *parts)

    def done(self, name, settings):
        marker = self.path(name, "stage.json")
        if self.fresh or not os.path.exists(marker):
            return False
        with open(marker) as f:
            return json.load(f).get("settings") == canon(settings)

    def start(self, name):
        d = self.path(name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        self.times[name] = time.time()
        print(f"[demo] stage {name}", flush=True)

    def finish(self, name, settings, info=None):
        seconds = time.time() - self.times.pop(name)
        with open(self.path(name, "stage.json"), "w") as f:
            json.dump(
                {"settings": canon(settings), "seconds": seconds, "info": info or {}}, f, indent=2
            )
        print(f"[demo] stage {name} done in {seconds:.0f}s", flush=True)

    def info(self, name):
        with open(self.path(name, "stage.json")) as f:
            return json.load(f)


def canon(x):
    """Settings as plain JSON (dataclasses expanded) so cached runs compare equal."""
    if dataclasses.is_dataclass(x):
        x = dataclasses.asdict(x)
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def digest(x):
    """A short hash of `x`'s settings: what a stage was trained from."""
    return hashlib.sha256(json.dumps(canon(x), sort_keys=True).encode()).hexdigest()[:12]
