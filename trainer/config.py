"""One validated training configuration, merged from a YAML file and command-line flags.

Every flag of `loraplex train` is a field here, spelled with underscores in YAML
(`max_seq_len: 256`) or dashes on the command line (`--max-seq-len 256`). Precedence:
flags given on the command line > `--config` YAML > the defaults below. A plain pydantic
model (not pydantic-settings): the environment is deliberately not a source, so a run is
fully described by its YAML + flags, and that is what the lineage records.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplex.errors import InvalidArgument
from loraplex.peft_format import ALL_LINEAR, COMPUTE_DTYPES, QUANTIZATIONS

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,63}$")


class TrainConfig(BaseModel):
    """Everything that decides what a training run produces (plus where it writes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what
    base: str
    data: str
    name: str
    val_data: str | None = None
    val_fraction: float | None = Field(None, ge=0.0, lt=1.0)  # None: auto (recipe.py)
    # model
    quantization: Literal[QUANTIZATIONS] = "nf4"  # peft_format's table, shared with serving
    compute_dtype: Literal[("auto", *COMPUTE_DTYPES)] = "auto"
    # None: chosen from the data and the base (`recipe.py`, "auto"); a value given wins
    r: int | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    rslora: bool = False
    dora: bool = False  # peft's use_dora: a learned magnitude per output feature (DoRA)
    # None: every linear layer but the output head, by leaf name; "all-linear": the same set,
    # resolved by peft; else names matched as peft matches them (loraplex.peft_format)
    target_modules: list[str] | str | None = None
    # optimisation
    epochs: float | None = Field(None, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_seq_len: int = Field(512, gt=1)
    train_on_prompt: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    # evaluation
    eval_steps: int | None = Field(None, gt=0)
    # evaluations without improvement before stopping; 0: off; None: auto (3)
    patience: int | None = Field(None, ge=0)
    eval_max_new_tokens: int = Field(64, gt=0)
    logging_steps: int = Field(10, gt=0)
    # run bookkeeping (does not change the adapter)
    output_dir: str | None = None
    budget: str | float | None = None  # wall-clock cap on probe + training: "90s", "10m", "1.5h"
    resume: bool = False
    # publishing
    publish: bool = True
    registry: str | None = None
    promote: str | None = None
    gate: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_tenant_slash_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be tenant/name, each [a-z0-9][a-z0-9._-]{0,63}")
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [m.strip() for m in v.split(",") if m.strip()]
        if v is not None and not v:
            raise ValueError("must name at least one module (or be left out for all)")
        if isinstance(v, list) and [str(m).lower() for m in v] == [ALL_LINEAR]:
            return ALL_LINEAR  # peft knows the shorthand only as the whole string
        return v

    @field_validator("budget")
    @classmethod
    def _budget_parses(cls, v: Any) -> Any:
        from loraplex.trainer.recipe import parse_budget

        try:
            parse_budget(v)
        except InvalidArgument as e:
            raise ValueError(e.message) from None
        return v

    @property
    def tenant(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def run_dir(self) -> Path:
        """Checkpoints, metrics.jsonl and the final adapter live here."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / self.name.replace("/", "__")

    def auto_fields(self) -> dict[str, Any]:
        """The fields `recipe.choose` may fill, as given (None: not given)."""
        from loraplex.trainer.recipe import AUTO_FIELDS

        return {k: getattr(self, k) for k in AUTO_FIELDS}

    def hyperparameters(self) -> dict[str, Any]:
        """What the lineage records: every field that shapes the adapter."""
        skip = {"base", "data", "val_data", "output_dir", "resume", "publish", "registry",
                "promote", "gate", "name", "budget"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InvalidArgument(f"{p}: cannot read config: {e.strerror}", field="config") from e
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{p}: not valid YAML: {e}", field="config") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InvalidArgument(f"{p}: the config must be a mapping of flag: value", field="config")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def build_config(flags: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Merge: defaults < YAML < flags. `flags` holds only what the user actually gave
    (None means "not given", so a YAML value is not clobbered by a flag's default)."""
    merged: dict[str, Any] = read_yaml(config_file) if config_file else {}
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        return TrainConfig(**merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "config"
            problems.append(f"{loc}: {err['msg']}")
        first = str(e.errors()[0]["loc"][0]) if e.errors() and e.errors()[0]["loc"] else None
        raise InvalidArgument("invalid training configuration: " + "; ".join(problems),
                              field=first) from e
