"""Per-epoch negatives from a training loop: `Refresher(config, out).refresh(epoch, checkpoint=None)`.

It keeps the Ray session and the run folder between calls: an epoch without a new checkpoint re-samples from the
kept candidates (seconds); an epoch with one re-embeds the corpus with it and re-mines. Each call returns when the
epoch's folder is complete.

Call it on one rank of a DDP job and let the others wait at a barrier. Called from every rank it is still safe: the
calls take OUT's writer lock in turn (each waits for the one before), and the later ones find the epoch complete.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from .config import Config, load_config
from .mine import MineResult, mine
from .run import claim
from .teachers.base import resolve_model_path


class Refresher:
    def __init__(self, config: Config | str | Path, out: str | Path, overrides: list[str] = (),
                 wait_lock: float = math.inf):
        """`wait_lock`: seconds to wait while another process writes OUT (default: until it is done)."""
        self.cfg = config if isinstance(config, Config) else load_config(config, overrides)
        self.out = Path(out)
        self.wait_lock = wait_lock
        self.checkpoint: str | None = None
        self.last: MineResult | None = None

    def refresh(self, epoch: int, checkpoint=None, mix_teacher: float = 0.0, overwrite: bool = False) -> Path:
        """Write OUT/epoch=NNNN and return its path. `checkpoint` is a folder or an in-memory model (anything with
        `save_pretrained` or sentence-transformers' `save`); later epochs without one keep using the latest."""
        with claim(self.out, self.wait_lock):  # the checkpoint is saved into OUT under the same lock as the mine
            if checkpoint is not None:
                self.checkpoint = self._as_folder(checkpoint, epoch)
            self.last = mine(self.cfg, self.out, epoch=epoch, overwrite=overwrite, checkpoint=self.checkpoint,
                             mix_teacher=mix_teacher if self.checkpoint else 0.0)
        return self.last.epoch_dir

    def _as_folder(self, model, epoch: int) -> str:
        if isinstance(model, (str, Path)):
            return str(model)
        folder = self.out / "_checkpoints" / f"epoch={epoch:04d}"
        if folder.exists():
            shutil.rmtree(folder)
        if hasattr(model, "save_pretrained") and not hasattr(model, "encode"):
            model.save_pretrained(folder)
            _copy_missing(Path(resolve_model_path(self.cfg.teacher.model)), folder)  # tokenizer / processor files
        elif hasattr(model, "save"):
            model.save(str(folder))
        else:
            raise TypeError(f"cannot save a {type(model).__name__} as a checkpoint: give a folder path, a "
                            "transformers model (save_pretrained) or a sentence-transformers model (save)")
        return str(folder)


def _copy_missing(source: Path, dest: Path) -> None:
    if not source.is_dir():
        return
    for path in source.iterdir():
        if path.is_file() and not (dest / path.name).exists() and path.suffix not in (".safetensors", ".bin"):
            shutil.copyfile(path, dest / path.name)


def refresh(config: Config | str | Path, out: str | Path, epoch: int, checkpoint=None,
            mix_teacher: float = 0.0) -> Path:
    """One-call form of `Refresher(config, out).refresh(epoch, checkpoint)`."""
    return Refresher(config, out).refresh(epoch, checkpoint, mix_teacher)
