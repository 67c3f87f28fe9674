"""One stage run of the study: a stage script with its flags, the files it reads and the paths it writes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairforget.layout import SCRIPTS

DISTRIBUTED_SCRIPTS = ("11_finetune_lora.py", "13_evaluate_stereoset.py", "15_evaluate_crows.py",
                       "20_evaluate_bbq.py")
# stages whose run folder is swapped in whole with a completion marker (run_folders.run_folder): a folder of theirs
# without a valid marker is incomplete, never a result
ATOMIC_RUN_SCRIPTS = ("13_evaluate_stereoset.py", "15_evaluate_crows.py", "20_evaluate_bbq.py")


@dataclass
class Stage:
    """One stage run: a script with its flags, the files it reads and the paths it writes."""

    name: str
    script: str
    args: dict[str, Any]
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    pipeline: str = "common"

    @property
    def record(self) -> Path:
        """Where the stage's ``.stage.json`` lives: inside its first output folder, or beside its first file."""
        first = self.outputs[0]
        return first / ".stage.json" if first.suffix == "" else first.parent / f".{first.name}.stage.json"

    def argv(self) -> list[str]:
        """The flags as the script's command line (``None`` values are left out; booleans as --x/--no-x)."""
        words: list[str] = []
        for key, value in self.args.items():
            flag = "--" + key.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + key.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                words += [flag, *map(str, value)]
            else:
                words += [flag, str(value)]
        return words

    def command(self, nproc: int = 1) -> list[str]:
        script = str(SCRIPTS / self.script)
        if nproc > 1 and self.script in DISTRIBUTED_SCRIPTS:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    script, *self.argv()]
        return [sys.executable, script, *self.argv()]
