"""`maws-data build` / `maws-data inspect` through the typer app: help for every option, a build that
equals the Python API's, clear exit-1 errors for bad sources and configs, and inspect's output."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import typer
from maws_data.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def digests(build_dir: Path) -> dict[str, str]:
    return {p.relative_to(build_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(build_dir.rglob("*")) if p.is_file() and p.name != "build.json"}


def tiny_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--source", str(source), "--out", str(out), "--image-size", "64", "--shard-size", "16",
            "--min-count", "2", "--processes", "1", "--decoder", "pil", "--no-progress", *extra]


def test_every_option_has_help():
    group = typer.main.get_command(app)
    assert {"build", "inspect"} <= set(group.commands)
    for name, cmd in group.commands.items():
        assert cmd.help, f"{name} has no help"
        for p in cmd.params:
            assert getattr(p, "help", None), f"maws-data {name}: {p.name} has no help text"
    build_opts = {o for p in group.commands["build"].params for o in p.opts}
    assert build_opts >= {"--source", "--out", "--image-size", "--shard-size", "--min-count", "--max-classes",
                          "--processes", "--runner", "--decoder", "--key-column", "--image-column",
                          "--caption-column", "--stoplist", "--overwrite", "--ambiguity", "--segmentation",
                          "--max-download-mb", "--max-pixels", "--s3-endpoint", "--mapping-cache",
                          "--text-unit-rows", "--task-timeout", "--task-retries"}
    result = runner.invoke(app, ["build", "--help"])
    assert result.exit_code == 0 and "--shard-size" in result.output and "resumes" in result.output


def test_cli_build_equals_python_build(tiny_source, tiny_build, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, tiny_args(tiny_source, out))
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(out))
    assert digests(out) == digests(tiny_build)  # same config via the CLI: identical bytes, manifest included


def test_cli_stoplist_max_classes_and_ambiguity_reach_the_build(tiny_source, tmp_path):
    """A user stop list replaces the built-in one; --max-classes caps the vocabulary; the choices land in the
    manifest's config. The tiny build's top class is animal.n.01 (#animals, #animal, ...)."""
    stop = tmp_path / "stop.txt"
    stop.write_text("# my own list\n#animals\nanimal\n", encoding="utf-8")
    out = tmp_path / "capped"
    r = runner.invoke(app, tiny_args(tiny_source, out, "--stoplist", str(stop), "--max-classes", "3",
                                     "--ambiguity", "skip"))
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in (out / "vocabulary.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["0", "1", "2"] and "n00015388" not in [row[1] for row in rows]
    rules = {line.split("\t")[0]: line.split("\t")[3] for line in (out / "hashtag_map.tsv").read_text().splitlines()[1:]}
    assert rules["animals"] == rules["animal"] == "stopword"
    assert rules["cute"] != "stopword"  # the built-in list (which has #cute) was replaced, not extended
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["ambiguity"], config["max_classes"], config["segmentation"]) == ("skip", 3, True)


def test_cli_errors_exit_2(tiny_source, tiny_build, tmp_path):
    r = runner.invoke(app, tiny_args(tiny_source, tmp_path / "a", "--caption-column", "text"))
    assert r.exit_code == 2
    assert "missing column(s) ['text']" in r.output and str(tiny_source) in r.output
    assert not (tmp_path / "a").exists()  # nothing claimed: the corrected command can use the same --out
    r = runner.invoke(app, tiny_args(tmp_path / "nope.parquet", tmp_path / "b"))
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, tiny_args(tiny_source, tmp_path / "c", "--stoplist", str(tmp_path / "missing.txt")))
    assert r.exit_code == 2 and "--stoplist" in r.output
    # an existing build with another config is refused, not overwritten
    existing = tmp_path / "existing"
    shutil.copytree(tiny_build, existing)
    r = runner.invoke(app, tiny_args(tiny_source, existing) + ["--min-count", "3"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert digests(existing) == digests(tiny_build)


def test_inspect(tiny_build, tmp_path):
    r = runner.invoke(app, ["inspect", str(tiny_build), "--top", "5", "--samples", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((tiny_build / "manifest.json").read_text())
    c = m["counts"]
    assert f"rows {c['rows']}  written {c['written']}  labeled {c['labeled']}" in r.output
    first_class = (tiny_build / "vocabulary.tsv").read_text().splitlines()[1].split("\t")
    assert first_class[1] in r.output and first_class[2] in r.output
    with tarfile.open(tiny_build / m["shards"][0]["name"]) as tf:
        first_key = tf.getmembers()[0].name.split(".")[0]
    assert first_key in r.output
    r2 = runner.invoke(app, ["inspect", str(tmp_path)])
    assert r2.exit_code == 1 and "no manifest.json" in r2.output


def test_the_console_script_starts_the_pool_before_typer_parses(monkeypatch):
    """`main` starts a local build's pool from the few options it reads itself: the right size, with
    --s3-endpoint in the environment the workers copy; nothing for Ray, help, another command or
    a value typer will refuse. The options it reads must be the build command's own."""
    from maws_data import cli
    from maws_data import runner as runner_module

    started: list[tuple[int, str | None]] = []
    monkeypatch.setattr(runner_module, "start_early",
                        lambda n, modules: started.append((n, runner_module.os.environ.get("MAWS_S3_ENDPOINT"))))
    monkeypatch.setattr(runner_module, "limit_threads", lambda n: {})
    monkeypatch.setenv("MAWS_S3_ENDPOINT", "")  # recorded, so that teardown removes what main sets
    monkeypatch.delenv("MAWS_S3_ENDPOINT")
    cli._start_build_pool(["build", "--source", "s3://b/p", "--processes", "3", "--s3-endpoint=http://127.0.0.1:1"])
    assert started == [(3, "http://127.0.0.1:1")]
    for argv in (["build", "--processes", "2", "--runner", "ray"], ["build", "--runner=ray"],
                 ["build", "--processes", "2", "--help"], ["inspect", "--processes", "2"],
                 ["build", "--processes", "two"], ["build", "--processes", "-1"], []):
        cli._start_build_pool(argv)
    assert len(started) == 1
    cli._start_build_pool(["build", "--source", "x"])  # --processes 0: one worker per core
    assert started[-1][0] == runner_module.local_processes(0)
    build_opts = {o for p in typer.main.get_command(app).commands["build"].params for o in p.opts}
    assert {"--processes", "--runner", "--s3-endpoint"} <= build_opts
