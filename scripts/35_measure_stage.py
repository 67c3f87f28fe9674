"""Stage 35: run an existing method stage (PCGU, stage 12; head pruning, stage 22) and record its cost.

    python scripts/35_measure_stage.py --method pcgu --model-folder models/methods/pcgu \\
        --command "scripts/12_pcgu_unlearn.py --model embedded:smollm2-135m-instruct --out models/methods/pcgu"

The stage runs unchanged as a child process (the same Python); its wall time and peak resident memory
(``RUSAGE_CHILDREN``) go to ``<log-dir>/method.json`` in the format the method stages 31-34 write, so
``scripts/30_compare_methods.py`` reads every method's cost the same way. The child's exit status is passed on.
"""

from __future__ import annotations

import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fairforget.artifacts import provenance, write_json
from fairforget.config import output_field, run_script
from fairforget.errors import FairforgetError


@dataclass
class Config:
    method: str = field(default="", metadata={"help": "name in the comparison (e.g. pcgu, head_pruning)"})
    model_folder: Path | None = field(default=None, metadata={"help": "the model folder the stage writes"})
    log_dir: Path | None = output_field(None, "method log", "default outputs/methods/<method>")
    command: str = field(default="", metadata={"help": "the stage script and its flags, one quoted string"})

    def validate(self) -> None:
        if not self.method or not self.command:
            raise FairforgetError("--method and --command (script and flags) are required")
        if not Path(shlex.split(self.command)[0]).is_file():
            raise FairforgetError(f"--command: stage script {shlex.split(self.command)[0]} not found")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    argv = shlex.split(cfg.command)
    code = subprocess.call([sys.executable, *argv])
    seconds = time.perf_counter() - start
    if code != 0:
        raise FairforgetError(f"{argv[0]} exited with status {code}; nothing recorded")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    log_dir = cfg.log_dir or Path("outputs/methods") / cfg.method
    write_json(log_dir / "method.json", {"method": cfg.method, "wall_seconds": round(seconds, 1),
                                         "peak_memory_mib": round(peak, 1), "model_folder": str(cfg.model_folder),
                                         "command": argv, "provenance": provenance(cfg)})
    print(f"{cfg.method}: {seconds:.0f} s, peak {peak:.0f} MiB -> {log_dir / 'method.json'}")


if __name__ == "__main__":
    run_script(main, Config())
