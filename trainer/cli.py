"""`loraplex train` and `loraplex eval`.

    loraplex train --base ./base --data acme.train.jsonl --name acme/upper \\
        --quantization nf4 --epochs 3 --promote prod
    loraplex train --config train.yaml --lr 1e-3          # flags win over the YAML
    torchrun --nproc_per_node 2 -m loraplex.cli train …   # DDP; rank 0 publishes
    loraplex eval --base ./base --adapter acme/upper@prod --data acme.test.jsonl --json

Every `train` flag defaults to "not given" (None) so that a YAML value is only overridden
by a flag the user actually typed; the real defaults live in `config.TrainConfig`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

_HELP_TRAIN = "Train a LoRA adapter on a tenant's JSONL data and publish it as a new version."
_HELP_EVAL = "Loss and exact-match of greedy completions: base alone vs base + adapter."


def train_command(
    base: str = typer.Option(None, help="Hugging Face causal-LM directory."),
    data: str = typer.Option(None, help="Training JSONL ({prompt, completion} or {messages})."),
    name: str = typer.Option(None, help="tenant/name to publish as."),
    config: Path = typer.Option(None, "--config", help="YAML with any of these flags."),
    val_data: str = typer.Option(None, help="Validation JSONL (else --val-fraction of --data)."),
    val_fraction: float = typer.Option(None, help="Held-out share of --data [auto: 10%, "
                                                  "8 to 200 rows]."),
    quantization: str = typer.Option(None, help="nf4 | int8 | none [nf4]."),
    compute_dtype: str = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]."),
    r: int = typer.Option(None, "--r", help="LoRA rank [auto: 16]."),
    alpha: float = typer.Option(None, help="LoRA alpha [auto: 2 x rank]."),
    dropout: float = typer.Option(None, help="LoRA dropout [auto: 0]."),
    rslora: bool = typer.Option(None, "--rslora/--no-rslora", help="Rank-stabilised scaling."),
    dora: bool = typer.Option(None, "--dora/--no-dora",
                              help="DoRA: a learned magnitude per output feature [off]."),
    target_modules: str = typer.Option(
        None, help="Comma list, or all-linear [every linear layer but the output head]."),
    epochs: float = typer.Option(None, help="Epochs [auto: from rows and base size]."),
    max_steps: int = typer.Option(None, help="Optimizer steps; > 0 overrides --epochs."),
    lr: float = typer.Option(None, help="Peak learning rate [auto: from base size, then a "
                                        "short probe]."),
    batch_size: int = typer.Option(None, help="Per-device batch size [auto: 8, 16 from "
                                              "2,000 rows]."),
    grad_accum: int = typer.Option(None, help="Gradient accumulation steps [1]."),
    warmup_ratio: float = typer.Option(None, help="Warm-up share of the steps [0.05]."),
    lr_scheduler: str = typer.Option(None, help="transformers scheduler name [cosine]."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay [0]."),
    max_seq_len: int = typer.Option(None, help="Longer examples are truncated [512]."),
    train_on_prompt: bool = typer.Option(None, "--train-on-prompt/--completion-only",
                                         help="Loss on prompt tokens too [completion only]."),
    gradient_checkpointing: bool = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    seed: int = typer.Option(None, help="Seed for data split, init, order, dropout [0]."),
    eval_steps: int = typer.Option(None, help="Evaluate and checkpoint every N steps "
                                              "[auto: ~12 per run]."),
    patience: int = typer.Option(None, help="Early stop after N evals without gain "
                                            "[auto: 3; 0: off]."),
    eval_max_new_tokens: int = typer.Option(None, help="Cap on generated tokens [64]."),
    logging_steps: int = typer.Option(None, help="Log every N steps [10]."),
    output_dir: str = typer.Option(None, help="Run directory [runs/<tenant>__<name>]."),
    budget: str = typer.Option(None, help="Wall-clock cap on probe + training: 90s, 10m, "
                                          "1.5h [none]."),
    resume: bool = typer.Option(None, "--resume/--no-resume",
                                help="Continue from the run directory's last checkpoint."),
    publish: bool = typer.Option(None, "--publish/--no-publish", help="Push to the registry."),
    registry: str = typer.Option(None, "--registry", envvar="LORAPLEX_REGISTRY",
                                 help="Registry directory or database URL."),
    promote: str = typer.Option(None, help="Alias to move to the new version if it passes."),
    gate: str = typer.Option(None, help="Promotion gate, e.g. 'val_loss<=0.5' "
                                        "[better val loss than the alias's version]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train, evaluate, publish; prints the new ref and digest."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "as_json", "quiet")}
    result = run_train(flags, config, progress=not quiet)
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    _report_train(result, as_json)


def run_train(flags: dict[str, Any], config_file: Path | None, *, progress: bool = True,
              extra_callbacks: list[Any] | None = None) -> dict[str, Any] | None:
    """The whole `train` command as a function (what tests and the benchmark call)."""
    from loraplex.trainer.config import build_config
    from loraplex.trainer.publish import publish
    from loraplex.trainer.train import train

    cfg = build_config(flags, config_file)
    res = train(cfg, extra_callbacks=extra_callbacks, progress=progress)
    if not res.is_main:
        return None
    out: dict[str, Any] = {"adapter_dir": str(res.adapter_dir), "metrics": res.metrics,
                           "compute": res.compute,
                           "recipe": res.report.get("recipe"), "probe": res.report.get("probe"),
                           "checkpoint": res.report.get("checkpoint"),
                           "curve_png": str(res.curve_png) if res.curve_png else None,
                           "base": cfg.base, "registry": cfg.registry,
                           "chat": res.splits is not None and res.splits.dataset.format == "messages"}
    if not cfg.publish:
        return out
    pub = publish(res.config or cfg, res.adapter_dir, res.metrics, res.splits, res.compute,
                  res.report)
    out.update({"ref": pub.version.ref, "digest": pub.version.digest,
                "created": pub.version.created, "promoted": pub.promoted,
                "alias": cfg.promote,
                "gate": None if pub.gate is None else {"passed": pub.gate.passed,
                                                       "reason": pub.gate.reason}})
    return out


def _report_train(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(out, sort_keys=True, default=str))
        return
    m = out["metrics"]
    typer.echo(f"trained {m['steps']} steps in {m['wall_s']:.1f}s, "
               f"{m.get('tokens_per_s') or 0:.0f} tokens/s; train loss {m['train_loss']:.4f}"
               + (f", val loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else "")
               + (f", val exact-match {m['val_exact_match']:.1%}"
                  if m.get("val_exact_match") is not None else ""))
    if out.get("compute"):
        typer.echo(f"compute dtype {out['compute']['dtype']} ({out['compute']['reason']})")
    recipe = out.get("recipe") or {}
    if recipe:
        v = recipe["values"]
        auto = [k for k in v if k not in recipe.get("given", [])]
        typer.echo(f"recipe: epochs {v['epochs']:g}, lr {v['lr']:.1e}, batch {v['batch_size']}, "
                   f"r {v['r']}, alpha {v['alpha']:g}"
                   + (f" (auto: {', '.join(auto)})" if auto else " (all given)"))
    probe = out.get("probe")
    if probe:
        typer.echo(f"lr probe: {probe['reason']}")
    for note in recipe.get("notes", []):
        typer.echo(f"note: {note}")
    if out.get("checkpoint"):
        typer.echo(f"kept: {out['checkpoint']['why']}")
    if out.get("curve_png"):
        typer.echo(f"curve: {out['curve_png']}")
    if "ref" not in out:
        typer.echo(f"adapter (not published): {out['adapter_dir']}")
        return
    typer.echo(f"{out['ref']} {out['digest']}" + ("" if out["created"] else " (unchanged)"))
    if out["alias"]:
        verdict = "promoted" if out["promoted"] else "NOT promoted"
        typer.echo(f"{out['alias']}: {verdict}: {out['gate']['reason']}")
    reg = f" --registry {out['registry']}" if out.get("registry") else ""
    chat = " --chat" if out.get("chat") else ""
    typer.echo(f"serve it:  loraplex serve --base {out['base']}{reg}\n"
               f"try it:    loraplex generate --adapter {out['ref']}{chat} \"<your prompt>\"")


def eval_command(
    base: Path = typer.Option(..., help="Hugging Face causal-LM directory."),
    adapter: str = typer.Option(..., help="Registry ref (t/n, t/n@alias, t/n:v3, sha256:…) "
                                          "or a local peft adapter directory."),
    data: Path = typer.Option(..., help="JSONL to score ({prompt, completion} or messages)."),
    registry: str = typer.Option(None, "--registry", envvar="LORAPLEX_REGISTRY"),
    quantization: str = typer.Option("none", help="Base loading: nf4 | int8 | none."),
    max_examples: int = typer.Option(0, help="Score only the first N examples (0: all)."),
    max_new_tokens: int = typer.Option(64, help="Cap on generated tokens."),
    batch_size: int = typer.Option(16),
    record: bool = typer.Option(None, "--record/--no-record",
                                help="Keep the scores in the registry beside the version "
                                "(the console compares them); default: when the adapter is "
                                "a registry ref and the token may publish."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object for scripts."),
) -> None:
    """Score the base alone and with the adapter on the same data."""
    report = run_eval(base, adapter, data, registry=registry, quantization=quantization,
                      max_examples=max_examples, max_new_tokens=max_new_tokens,
                      batch_size=batch_size)
    report["recorded"] = record_eval(report, registry, record)
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
        return
    _print_eval(report)


def _adapter_path(adapter: str, registry: str | None, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """A local peft directory as is; anything else is a registry ref pulled to `tmp`."""
    local = Path(adapter)
    if (local / "adapter_config.json").is_file():
        return local, {"adapter": str(local)}
    from loraplex.trainer.publish import caller_identity, open_registry

    reg = open_registry(registry)
    try:
        ident = caller_identity(reg)
        v = reg.resolve(ident, adapter)
        path = reg.pull(ident, v.ref, tmp / "adapter")
    finally:
        reg.close()
    return path, {"adapter": adapter, "ref": v.ref, "digest": v.digest,
                  "base_digest": v.base.digest}


def _check_base(base: Path, ident: dict[str, Any]) -> None:
    """A registry version knows its base: refuse a different one with a clear error
    instead of a shape mismatch deep inside peft."""
    if "base_digest" not in ident:
        return
    from loraplex.errors import IncompatibleAdapter
    from loraplex.fingerprint import fingerprint_base

    have = fingerprint_base(base).digest
    if have != ident["base_digest"]:
        raise IncompatibleAdapter(f"{ident['ref']} was trained on base {ident['base_digest']}, "
                                  f"not {have} ({base})", field="base")


def run_eval(base: Path, adapter: str, data: Path, *, registry: str | None = None,
             quantization: str = "none", max_examples: int = 0, max_new_tokens: int = 64,
             batch_size: int = 16) -> dict[str, Any]:
    """{"base": {loss, exact_match, n}, "adapter": {…}, "ref", "digest", "data"}."""
    from peft import PeftModel

    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.data import load_jsonl
    from loraplex.trainer.evaluate import evaluate, max_completion_tokens
    from loraplex.trainer.model import load_base

    ds = load_jsonl(data)
    examples = ds.examples[:max_examples] if max_examples > 0 else ds.examples
    cfg = TrainConfig(base=str(base), data=str(data), name="eval/eval",
                      quantization=quantization)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="loraplex-eval-") as tmp:
        path, ident = _adapter_path(adapter, registry, Path(tmp))
        _check_base(base, ident)
        model, tok = load_base(base, cfg)
        model = PeftModel.from_pretrained(model, str(path))
        new_tokens = max_completion_tokens(tok, examples, max_new_tokens)
        kw = {"max_new_tokens": new_tokens, "batch_size": batch_size}
        with_adapter = evaluate(model, tok, examples, **kw)
        with model.disable_adapter():
            alone = evaluate(model, tok, examples, **kw)
    return {**ident, "data": str(data), "data_digest": ds.digest, "data_format": ds.format,
            "base": alone.as_dict(), "with_adapter": with_adapter.as_dict()}


def record_eval(report: dict[str, Any], registry: str | None, record: bool | None) -> bool:
    """Keep the adapter's scores as an evaluation record of its version
    (`Registry.record_evaluation`, name "eval"). `record` None: only for a registry ref,
    and quietly not when the token's scope cannot publish; True: or fail saying why."""
    from loraplex.errors import InvalidArgument, PermissionDenied
    from loraplex.trainer.publish import caller_identity, open_registry

    if record is False or (record is None and "ref" not in report):
        return False
    if "ref" not in report:
        raise InvalidArgument("--record keeps scores beside a registry version: pass a "
                              "registry ref as --adapter, not a directory", field="record")
    scores = report["with_adapter"]
    reg = open_registry(registry)
    try:
        reg.record_evaluation(
            caller_identity(reg), report["ref"], "eval",
            {"loss": scores["loss"], "exact_match": scores["exact_match"]},
            data_digest=report["data_digest"],
            detail={"data": report["data"], "n": scores["n"], "format": report["data_format"],
                    "base_alone": {k: report["base"][k] for k in ("loss", "exact_match")}})
    except PermissionDenied:
        if record:
            raise
        return False
    finally:
        reg.close()
    return True


def _print_eval(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = report.get("ref") or report["adapter"]
    t = Table(title=f"{title} on {report['data']}")
    for col in ("model", "loss", "exact-match", "n"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for label, key in (("base", "base"), ("base + adapter", "with_adapter")):
        r = report[key]
        t.add_row(label, f"{r['loss']:.4f}", f"{r['exact_match']:.1%}", str(r["n"]))
    Console(file=sys.stdout).print(t)
    if report.get("recorded"):
        typer.echo(f"recorded in the registry beside {report['ref']}")


class GateRunner:
    """`--gate` of `loraplex registry compress|merge`: the trainer's evaluation
    (`trainer/gate.py`), handed to the registry CLI, which does not import the trainer."""

    def check(self, gate: str) -> None:
        from loraplex.trainer.gate import parse

        parse(gate)

    def run(self, reg: Any, identity: Any, gate: str, new_ref: str, source_refs: list[str],
            data: Path, base_dir: Path, max_examples: int) -> Any:
        from loraplex.trainer.gate import parse, run_gate

        return run_gate(reg, identity, parse(gate), new_ref, source_refs, data, base_dir,
                        max_examples=max_examples)


def register(app: typer.Typer) -> None:
    """Attach `train` and `eval` to the root `loraplex` command, and give the registry's
    `compress`/`merge` their `--gate`."""
    from loraplex.registry.algebra_cli import use_gate_runner

    app.command("train", help=_HELP_TRAIN)(train_command)
    app.command("eval", help=_HELP_EVAL)(eval_command)
    use_gate_runner(GateRunner())
