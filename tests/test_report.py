"""Sweep report: fake Hydra multirun dirs -> table, CSV, plot; failed jobs; differing-key detection."""

import csv
import json

import pytest
import yaml

from fedmllm.tracking.report import (
    flatten,
    job_status,
    load_job,
    method_label,
    parse_overrides,
    results_table,
    settings,
    to_markdown,
    write_report,
)

BASE = ["model=tiny-llava", "num_rounds=2"]


def config(aggregator="fedavg", alpha=0.5, num_rounds=2):
    return {
        "num_rounds": num_rounds,
        "seed": 42,
        "out_dir": "/somewhere/else",
        "aggregator": {"name": aggregator, "_target_": f"flwr.{aggregator}", "fraction_train": 1.0},
        "partitioner": {"name": "dirichlet", "alpha": alpha},
    }


def rounds(accs, bytes_up=100, **extra):
    return [
        {
            "round": i,
            "accuracy": a,
            "macro_f1": a - 0.1,
            "auroc": a + 0.05,
            "accuracy_no_image": 0.5,
            "accuracy_both": a,
            "accuracy_text": 0.5,
            "bytes_up": 0 if i == 0 else bytes_up,
            **extra,
        }
        for i, a in enumerate(accs)
    ]


def make_job(root, num, overrides=None, cfg=None, rows=None, tail=""):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    if overrides is not None:
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if cfg is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if rows is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return d


@pytest.fixture
def sweep(tmp_path):
    """aggregator=fedavg,fedprox x partitioner.alpha=0.1,1.0; job 3 crashed before logging a round."""
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    make_job(
        tmp_path,
        0,
        BASE + ["aggregator=fedavg", "partitioner.alpha=0.1"],
        config("fedavg", 0.1),
        rounds([0.5, 0.7, 0.6]),
    )
    make_job(
        tmp_path,
        1,
        BASE + ["aggregator=fedavg", "partitioner.alpha=1.0"],
        config("fedavg", 1.0),
        rounds([0.5, 0.6, 0.8]),
    )
    make_job(
        tmp_path, 2, BASE + ["aggregator=fedprox", "partitioner.alpha=0.1"], config("fedprox", 0.1), rounds([0.5, 0.55])
    )  # stopped after round 1 of 2
    make_job(tmp_path, 3, BASE + ["aggregator=fedprox", "partitioner.alpha=1.0"], config("fedprox", 1.0))
    return tmp_path


def test_flatten_and_overrides_parse_to_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": {}}) == {"a.b": 1, "a.c.d": None, "e": {}}
    assert parse_overrides(["+x.y=1", "agg=fedavg", "~z", "s='a=b'"]) == {
        "x.y": "1",
        "agg": "fedavg",
        "z": "<deleted>",
        "s": "'a=b'",
    }
    with pytest.raises(ValueError, match="override 'oops' has no '='"):
        parse_overrides(["oops"])


def test_job_status():
    assert job_status([], 2) == ("failed", "no rounds logged")
    assert job_status(rounds([0.5, 0.6]), 2) == ("incomplete", "round 1 of 2")
    assert job_status(rounds([0.5, 0.6, 0.7]), 2) == ("ok", "")
    assert job_status(rounds([0.5, 0.6, 0.7]), 2, truncated=True)[0] == "incomplete"
    assert job_status(rounds([0.5]), None) == ("ok", "")
    # every round ran and dropped every reply (the run raised NoRoundAggregated); one kept reply is a round
    dropped = [{"partition-id": 0, "dropped": "update norm 0.1 > aggregator.max_update_norm=1e-12"}]
    rows = rounds([0.5, 0.5, 0.5])
    for r in rows[1:]:
        r["clients"] = dropped
    assert job_status(rows, 2) == ("failed", "no round aggregated")
    rows[2]["clients"] = [*dropped, {"partition-id": 1}]
    assert job_status(rows, 2) == ("ok", "")


def test_swept_keys_are_the_overrides_that_differ(sweep):
    jobs = [load_job(sweep / str(i)) for i in range(4)]
    keys, values = settings(jobs)
    assert keys == ["aggregator", "partitioner.alpha"]  # model / num_rounds are the same everywhere
    assert values[3] == {"aggregator": "fedprox", "partitioner.alpha": "1.0"}  # failed job: from .hydra


def test_without_hydra_overrides_the_differing_config_keys_are_used_and_groups_fold(tmp_path):
    make_job(tmp_path, 0, cfg=config("fedavg", 0.1), rows=rounds([0.5, 0.6, 0.7]))
    make_job(tmp_path, 1, cfg=config("fedprox", 0.1), rows=rounds([0.5, 0.6, 0.7]))
    make_job(tmp_path, 2, cfg=config("fedprox", 1.0), rows=rounds([0.5, 0.6, 0.7]))
    make_job(tmp_path, 3)  # no config: nothing to compare, shown as "-"
    jobs = [load_job(tmp_path / str(i)) for i in range(4)]
    keys, values = settings(jobs)
    # aggregator.name and aggregator._target_ differ: one `aggregator` column; out_dir is ignored
    assert keys == ["aggregator", "partitioner.alpha"]
    assert values[1] == {"aggregator": "fedprox", "partitioner.alpha": 0.1}
    assert values[3] == {"aggregator": "-", "partitioner.alpha": "-"}
    assert settings(jobs[:1])[0] == []  # one job: nothing differs


def test_table_has_one_row_per_job_with_final_and_best_metrics(sweep):
    jobs = [load_job(sweep / str(i)) for i in range(4)]
    columns, table = results_table(jobs)
    assert columns == [
        "job",
        "aggregator",
        "partitioner.alpha",
        "status",
        "rounds",
        "accuracy",
        "macro_f1",
        "auroc",
        "accuracy_no_image",
        "accuracy_both",
        "accuracy_text",
        "bytes_up_total",
        "best_accuracy",
        "best_round",
    ]
    r0, r1, r2, r3 = table
    assert (r0["status"], r0["rounds"], r0["accuracy"], r0["best_accuracy"], r0["best_round"]) == ("ok", 2, 0.6, 0.7, 1)
    assert r0["macro_f1"] == pytest.approx(0.5) and r0["bytes_up_total"] == 200
    assert (r1["accuracy"], r1["best_round"]) == (0.8, 2)
    assert r2["status"] == "incomplete (round 1 of 2)" and r2["accuracy"] == 0.55
    assert r3["status"] == "failed (no metrics.jsonl)" and r3["accuracy"] is None and r3["best_accuracy"] is None
    assert r3["aggregator"] == "fedprox"
    # round 0 (the untrained adapter) is never the best round, even when it scored highest
    best0 = load_job(make_job(sweep / "x", 0, cfg=config("fedavg", 0.1), rows=rounds([0.9, 0.6, 0.7])))
    assert results_table([best0])[1][0]["best_round"] == 2


def test_metric_is_selectable_and_an_unknown_one_is_named(sweep):
    jobs = [load_job(sweep / str(i)) for i in range(4)]
    columns, table = results_table(jobs, metric="auroc")
    assert "best_auroc" in columns and table[1]["best_auroc"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="metric 'acc' is not in any job's metrics.jsonl; choose one of .*'accuracy'"):
        results_table(jobs, metric="acc")


def test_markdown_marks_missing_values_and_formats_numbers():
    md = to_markdown(
        ["job", "accuracy", "bytes_up_total", "note"],
        [{"job": "0", "accuracy": 0.71234, "bytes_up_total": 11215872, "note": "a|b"}, {"job": "1", "accuracy": None}],
    )
    lines = md.splitlines()
    assert lines[0] == "| job | accuracy | bytes_up_total | note |"
    assert lines[2] == "| 0 | 0.712 | 11,215,872 | a\\|b |"
    assert lines[3] == "| 1 | - | - | - |"


def test_write_report_writes_md_csv_png(sweep):
    markdown, paths = write_report(sweep)
    assert paths == {"md": sweep / "report.md", "csv": sweep / "report.csv", "png": sweep / "report.png"}
    assert markdown in paths["md"].read_text()
    assert "| 1 | fedavg | 1.0 | ok | 2 | 0.800 |" in markdown
    assert "failed (no metrics.jsonl)" in markdown
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[1]["accuracy"] == "0.8" and rows[3]["accuracy"] == "" and rows[0]["partitioner.alpha"] == "0.1"
    assert paths["png"].stat().st_size > 5000


def test_truncated_metrics_line_makes_the_job_incomplete_not_a_crash(tmp_path):
    make_job(tmp_path, 0, BASE, config(), rounds([0.5, 0.6, 0.7]), tail='{"round": 3, "accu')
    job = load_job(tmp_path / "0")
    assert job.status == "incomplete" and len(job.rows) == 3


def test_all_jobs_failed_still_gives_a_table(tmp_path):
    make_job(tmp_path, 0, BASE + ["seed=1"])
    make_job(tmp_path, 1, BASE + ["seed=2"], config())
    markdown, paths = write_report(tmp_path)
    assert "| 0 | 1 | failed (no config.yaml or metrics.jsonl) |" in markdown
    assert "| 1 | 2 | failed (no metrics.jsonl) |" in markdown
    assert paths["png"].is_file()


def test_cli_report_multirun_and_single_run_and_bad_dir(sweep, tmp_path_factory, capsys):
    from fedmllm.cli import main

    main(["report", str(sweep), "--metric", "auroc"])
    out = capsys.readouterr().out
    assert "| job | aggregator | partitioner.alpha |" in out and f"plot: {sweep / 'report.png'}" in out
    main(["report", str(sweep / "0")])  # a single run keeps its per-round lines
    out = capsys.readouterr().out
    assert "round   2 |" in out and (sweep / "0" / "metrics.png").is_file()
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(SystemExit):
        main(["report", str(empty)])
    assert "no metrics.jsonl and no job subdirs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(sweep), "--metric", "nope"])
    assert "metric 'nope'" in capsys.readouterr().err


def grid_config(scenario="aligned", seed=0, aggregator="fedavg", prompt="plain", adareg=False, only=None):
    sc = {"name": scenario, **({"mrate": 0.3} if scenario == "missing" else {})}
    client = {"algorithm": "standard", **({"only": only} if only is not None else {})}
    return {
        "num_rounds": 1,
        "seed": seed,
        "scenario": sc,
        "prompt": {"name": prompt},
        "aggregator": {"name": aggregator, "client": client},
        "train": {"adaptive_reg": {"enabled": adareg}},
    }


@pytest.fixture
def grid(tmp_path):
    """+cell=aligned,missing,missing_aug x seed=0,1,2, plus two local-baseline clients x seed=0,1;
    the missing_aug job of seed 2 crashed."""
    cells = {"aligned": {}, "missing": {"scenario": "missing"}, "missing_aug": {"scenario": "missing", "prompt": "aug"}}
    num = 0
    accs = {
        ("aligned", 0): 0.80,
        ("aligned", 1): 0.90,
        ("aligned", 2): 0.85,
        ("missing", 0): 0.70,
        ("missing", 1): 0.60,
        ("missing", 2): 0.65,
        ("missing_aug", 0): 0.75,
        ("missing_aug", 1): 0.65,
    }
    for cell, kw in cells.items():
        for seed in (0, 1, 2):
            acc = accs.get((cell, seed))
            make_job(
                tmp_path,
                num,
                [f"+cell={cell}", f"seed={seed}"],
                grid_config(seed=seed, **kw),
                rounds([0.5, acc]) if acc is not None else None,
            )
            num += 1
    for only, seed, acc in ((0, 0, 0.6), (1, 0, 0.7), (0, 1, 0.5), (1, 1, 0.8)):
        make_job(
            tmp_path,
            num,
            [f"+cell=local{only}", f"seed={seed}"],
            grid_config(seed=seed, aggregator="local", only=only),
            rounds([0.5, acc]),
        )
        num += 1
    return tmp_path


def test_jobs_that_differ_only_in_seed_are_grouped_into_mean_and_std(grid):
    from fedmllm.tracking.report import load_job, seed_table

    jobs = [load_job(d) for d in sorted(grid.iterdir(), key=lambda p: int(p.name))]
    columns, table = seed_table(jobs)
    assert columns[:2] == ["cell", "n"]
    by_cell = {r["cell"]: r for r in table}
    # by hand: 0.80, 0.90, 0.85 -> mean 0.85, sample std 0.05
    assert by_cell["aligned"]["accuracy"] == "0.850 ± 0.050 (3)" and by_cell["aligned"]["n"] == "3 of 3"
    assert by_cell["missing_aug"]["n"] == "2 of 3"  # the crashed job is counted, not averaged
    assert by_cell["missing_aug"]["accuracy"] == "0.700 ± 0.071 (2)"
    assert seed_table(jobs[:1]) is None  # nothing swept: no grouped table


def test_grid_table_has_scenarios_as_rows_methods_as_columns_and_pools_local_clients(grid):
    from fedmllm.tracking.report import grid_table, load_job

    jobs = [load_job(d) for d in sorted(grid.iterdir(), key=lambda p: int(p.name))]
    columns, table = grid_table(jobs)
    assert columns == ["scenario", "fedavg", "fedavg+aug", "local"]
    rows = {r["scenario"]: r for r in table}
    assert set(rows) == {"aligned", "missing (m=0.3)"}
    assert rows["missing (m=0.3)"]["fedavg"] == "0.650 ± 0.050 (3)"
    assert rows["missing (m=0.3)"]["fedavg+aug"] == "0.700 ± 0.071 (2)"
    assert rows["aligned"]["local"] == "0.650 ± 0.129 (4)"  # 2 clients x 2 seeds: 0.6, 0.7, 0.5, 0.8
    assert rows["aligned"]["fedavg+aug"] == "-"


def test_write_report_adds_the_grouped_and_grid_tables(grid):
    markdown, paths = write_report(grid)
    text = paths["md"].read_text()
    assert "## Over seeds" in text and "## Scenarios x methods" in text
    assert "0.850 ± 0.050 (3)" in markdown
    assert paths["grid_csv"].read_text().splitlines()[0] == "scenario,fedavg,fedavg+aug,local"


def test_several_sweep_dirs_make_one_report_grouped_over_their_seeds(tmp_path):
    """A grid's seeds swept on different days: one table, jobs named <sweep>/<job>, seeds grouped."""
    from fedmllm.tracking.report import write_report

    for sweep, seed, accs in (("day1", 42, [0.5, 0.6, 0.7]), ("day2", 43, [0.5, 0.6, 0.9])):
        make_job(tmp_path / sweep, 0, [f"seed={seed}", "aggregator=fedavg"], config("fedavg", 0.1), rounds(accs))
    markdown, paths = write_report([tmp_path / "day1", tmp_path / "day2"], out=tmp_path / "both")
    assert paths["md"].parent == tmp_path / "both" and "day1/0" in markdown and "day2/0" in markdown
    assert "0.800 ± 0.141 (2)" in markdown  # the two seeds' final accuracy, grouped


def test_a_runs_final_accuracy_is_what_a_sweeper_maximizes(tmp_path):
    from fedmllm.cli import final_accuracy

    assert final_accuracy(str(tmp_path)) is None  # no metrics.jsonl
    make_job(tmp_path, 0, rows=rounds([0.5, 0.6, 0.7]) + [{"round": 3, "train_loss": 0.1}])
    assert final_accuracy(str(tmp_path / "0")) == 0.7  # the last evaluated round


def test_report_puts_global_and_personalized_accuracy_side_by_side(tmp_path):
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    for i, (aggregator, personal) in enumerate([("fedavg", 0.6), ("fedsa_lora", 0.8)]):
        cfg = {**config(aggregator), "scenario": {"name": "missing", "mrate": 0.3}}
        extra = {"client_accuracy_mean": personal, "client_accuracy_min": personal - 0.1}
        make_job(tmp_path, i, BASE + [f"aggregator={aggregator}"], cfg, rounds([0.5, 0.7, 0.65], **extra))
    markdown, paths = write_report(tmp_path)
    assert "Global vs personalized" in paths["md"].read_text()
    with open(paths["personal_csv"]) as f:
        table = list(csv.DictReader(f))
    assert [
        (r["scenario"], r["method"], r["global"], r["personalized (client mean)"], r["worst client"]) for r in table
    ] == [
        ("missing (m=0.3)", "fedavg", "0.650 (1)", "0.600 (1)", "0.500 (1)"),
        ("missing (m=0.3)", "fedsa_lora", "0.650 (1)", "0.800 (1)", "0.700 (1)"),
    ]


def test_a_run_without_the_servers_pre_trained_adapter_is_its_own_method():
    stages = {"server_stage.pretrain.enabled": True, "aggregator.name": "fedavg"}
    assert method_label({**stages, "server_stage.pretrain.lora.enabled": True}) == "fedavg"
    assert method_label({**stages, "server_stage.pretrain.lora.enabled": False}) == "fedavg (no pre-trained adapter)"
    # no server stages at all (server_stage=none): nothing was left out, the label stays
    assert (
        method_label({**stages, "server_stage.pretrain.enabled": False, "server_stage.pretrain.lora.enabled": False})
        == "fedavg"
    )
