"""What a training run is: its settings (:class:`TrainJob`), its stages and its error."""
from __future__ import annotations

from dataclasses import dataclass

STAGES = {1: "backbone", 2: "adapter1", 3: "adapter2"}


class TrainError(RuntimeError):
    """The training job cannot go on (the message says why and what to change)."""


@dataclass(frozen=True)
class TrainJob:
    """Plain values (picklable: shipped to TorchDistributor processes)."""
    input: str
    output: str
    model_cfg: dict
    preprocess_cfg: dict
    train_cfg: dict
    input_format: str = "auto"
    key_column: str | None = None
    bytes_column: str | None = None

    @classmethod
    def from_config(cls, input_url: str, output_url: str, cfg) -> "TrainJob":
        return cls(input_url, output_url, cfg["model"].to_dict(), cfg["preprocess"].to_dict(),
                   cfg["train"].to_dict(), cfg["extract.input_format"], cfg["extract.key_column"],
                   cfg["extract.bytes_column"])

    def stage_cfg(self, stage: int) -> dict:
        return self.train_cfg[f"stage{stage}"]

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoints."""
        keep = ("seed", "batch_size", "temperature", "augment_strength", "augmentations", "max_side",
                "backbone_blocks", "fine_head", "cache_views", "stage1", "stage2", "stage3")
        # model.input_layout at its default is left out: runs written before the key existed still resume
        model = {k: v for k, v in self.model_cfg.items() if not (k == "input_layout" and v == "auto")}
        train = {k: self.train_cfg[k] for k in keep}
        # the stage-1 regularisers join the fingerprint only when on (runs from before they existed resume)
        if self.train_cfg.get("koleo"):
            train["koleo"] = self.train_cfg["koleo"]
        if self.train_cfg.get("teacher"):
            train.update({k: self.train_cfg[k] for k in ("teacher", "teacher_weight", "teacher_temperature",
                                                        "teacher_size")})
        return {"input": self.input, "model": model, "preprocess": self.preprocess_cfg, "train": train}


def external_stage1_error(backbone: str) -> TrainError:
    return TrainError(f"training stage 1 trains the backbone, but model.backbone={backbone} is your own model "
                      "file: the backbone is frozen. Train the heads only: train.stages=[2, 3]")
